"""Datasets: where images and captions come from, the train/holdout split, and preprocessing.

Three sources fill the same ``Record`` list: a local folder, a Hugging Face dataset (hub id or a
local copy), and a generated "synthetic" set of two visually distinct styles that needs no
download. Records are keyed by the SHA-256 of the image bytes, so the split (and any cache built
on it) follows image content, not file names or row order. ``preflight`` decodes every record
before training and drops (never deletes or edits) the files that can't be used; the trainer writes
its report to ``data_report.json``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, ImageDraw, ImageFile, ImageFilter, ImageOps, UnidentifiedImageError

from ghibli_lab.hub import check_hub_resource

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
OTHER_IMAGE_EXTENSIONS = (".gif", ".heic", ".heif", ".avif", ".jxl", ".svg", ".psd", ".ico")  # reported, not read
SYNTHETIC_VERSION = "v2"  # bump when make_synthetic_image changes, so stale caches aren't reused
SYNTHETIC_STYLES = ("watercolor", "comic")  # the synthetic set's style folders (dataset.style)


@dataclass(frozen=True)
class Record:
    key: str  # sha256 hex of the encoded image bytes
    name: str  # origin for messages: a file path, or "<hub id>#<row index>"
    caption: str  # final caption, prefix included
    path: str | None = None  # file on disk, or None when the bytes are held in `data`
    data: bytes | None = None  # encoded image bytes (hub rows)
    captioned: bool = True  # False: the image had no (or an empty) caption; dataset.default_caption stood in


def load_records(ds_cfg: DictConfig, cache_dir: str | Path) -> list[Record]:
    """All usable records of the dataset in a deterministic order, capped at ``dataset.num_images``.

    Raises FileNotFoundError / ValueError naming the config key when the data can't be used.
    """
    limit = ds_cfg.num_images
    if limit is not None and limit < 1:
        raise ValueError(f"dataset.num_images must be >= 1 or null, got {limit}")
    if ds_cfg.source == "synthetic":
        if limit is None:
            raise ValueError("dataset.num_images is required for dataset.source=synthetic")
        return _folder_records(style_dir(synthetic_folder(limit, ds_cfg.resolution, cache_dir), ds_cfg.style), ds_cfg)
    if ds_cfg.source == "folder":
        return _folder_records(style_dir(_existing_dir(ds_cfg.path), ds_cfg.style), ds_cfg)
    if ds_cfg.source == "hub":
        return _hub_records(ds_cfg)
    raise ValueError(f"dataset.source={ds_cfg.source!r} is not one of 'hub', 'folder', 'synthetic'")


def style_dir(root: Path, style: str | None) -> Path:
    """``root`` itself, or with ``dataset.style`` its subfolder of that name (a multi-style
    dataset is one folder per style: ghibli/, shinkai/, comic/)."""
    if style is None:
        return root
    folder = root / style
    if not folder.is_dir():
        styles = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise FileNotFoundError(f"dataset.style={style!r}: no folder {folder}; the styles there: {', '.join(styles) or 'none'}")
    return folder


def _caption(raw: Any, ds_cfg: DictConfig) -> tuple[str, bool]:
    """(final caption, whether the image had a caption of its own rather than the default)."""
    text = "" if raw is None else str(raw).strip()
    return ds_cfg.caption_prefix + (text or ds_cfg.default_caption), bool(text)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Folder source


def _existing_dir(path: str | None) -> Path:
    if not path:
        raise ValueError("dataset.path is required for dataset.source=folder")
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"dataset.path={str(path)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"dataset.path={str(path)!r} is not a directory")
    return root


def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, extension case-insensitive), sorted by relative path.

    Symlinked folders inside the dataset are followed, each real folder once (a link back to a
    parent would otherwise loop forever); files and folders whose real path lies outside the
    dataset root are not read (a link could expose any file to training), and are reported.
    Files of image types we don't read (GIF, HEIC, ...) are reported too, never silently dropped."""
    real_root = root.resolve()
    found, outside, unsupported, seen = [], [], [], set()
    # followlinks: datasets are often assembled from symlinked folders.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = Path(dirpath).resolve()
        if real in seen or not real.is_relative_to(real_root):
            if not real.is_relative_to(real_root):
                outside.append(dirpath)
            dirnames[:] = []
            continue
        seen.add(real)
        # Hidden entries are not training data: .ipynb_checkpoints copies, macOS "._x.png" stubs.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath, name)
            if name.lower().endswith(IMAGE_EXTENSIONS):
                if path.resolve().is_relative_to(real_root):
                    found.append(path)
                else:
                    outside.append(str(path))
            elif name.lower().endswith(OTHER_IMAGE_EXTENSIONS):
                unsupported.append(str(path))
    if outside:
        log.warning("dataset.path=%s: %d links point outside the dataset folder and are not read (e.g. %s)",
                    root, len(outside), outside[0])
    if unsupported:
        log.warning("dataset.path=%s: %d files of an image type not read here are skipped (e.g. %s); "
                    "convert them to PNG or JPEG (read: %s)", root, len(unsupported), unsupported[0], ", ".join(IMAGE_EXTENSIONS))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def inside(path: Path, root: Path) -> bool:
    """Whether ``path``'s real location (links resolved) is inside ``root``'s."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def _folder_records(root: Path, ds_cfg: DictConfig) -> list[Record]:
    images = find_images(root)
    if not images:
        looked_for = ", ".join(IMAGE_EXTENSIONS)
        raise ValueError(f"dataset.path={str(root)!r} holds no images (looked for {looked_for})")
    if ds_cfg.num_images is not None:
        images = images[: ds_cfg.num_images]  # before hashing: a small cap should be quick
    metadata = _metadata_captions(root, ds_cfg.caption_column)
    records = []
    for image in images:
        txt = image.with_suffix(".txt")
        own = txt.is_file() and inside(txt, root)  # a caption link to a file outside is not read
        raw = _read_text(txt) if own else metadata.get(image.relative_to(root).as_posix())
        key = _sha256(image.read_bytes())
        caption, captioned = _caption(raw, ds_cfg)
        records.append(Record(key, str(image), caption, path=str(image), captioned=captioned))
    return records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: editors on Windows write a BOM
    except UnicodeDecodeError as e:
        raise ValueError(f"caption file {path} is not valid UTF-8: {e}") from e


def _metadata_captions(root: Path, caption_column: str) -> dict[str, Any]:
    """{relative file name: caption} from metadata.jsonl (preferred) or metadata.csv in ``root``."""
    jsonl, csv_path = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file():
        source, rows = jsonl, _jsonl_rows(jsonl)
    elif csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            source, rows = csv_path, list(csv.DictReader(f))
    else:
        return {}
    captions = {}
    for n, row in enumerate(rows, start=1):
        for column in ("file_name", caption_column):
            if column not in row:
                raise ValueError(
                    f"{source}: row {n} has no {column!r} column (needs file_name, the image path "
                    f"relative to dataset.path, and dataset.caption_column); it has {list(row)}"
                )
        name = Path(str(row["file_name"])).as_posix()  # normalises "./a.png" and "sub\\a.png" alike
        captions[name] = row[caption_column]
    return captions


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows += [row] if row else []
    return rows


# Hub source (a hub id, a save_to_disk directory, or anything datasets.load_dataset reads)


def _hub_records(ds_cfg: DictConfig) -> list[Record]:

    if not ds_cfg.path:
        raise ValueError("dataset.path is required for dataset.source=hub")
    name = str(ds_cfg.path)
    check_hub_resource(name, "dataset", "dataset.path", "README.md")
    import datasets  # lazy: a second to import, and only this source needs it

    local = Path(name).expanduser()
    if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(str(local))  # a save_to_disk copy
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"dataset.path={name!r} has no 'train' split; it has {list(ds)}")
            ds = ds["train"]
    else:
        ds = datasets.load_dataset(name, split="train")
    image_col, caption_col = ds_cfg.image_column, ds_cfg.caption_column
    for column, key in ((image_col, "dataset.image_column"), (caption_col, "dataset.caption_column")):
        if column not in ds.column_names:
            raise ValueError(f"{key}={column!r} is not a column of {name}; columns: {ds.column_names}")
    if ds_cfg.num_images is not None:
        ds = ds.select(range(min(len(ds), ds_cfg.num_images)))
    # decode=False gives the encoded bytes: hashable, and decoded only when the trainer needs them.
    ds = ds.select_columns(list(dict.fromkeys([image_col, caption_col])))
    ds = ds.cast_column(image_col, datasets.Image(decode=False))
    records, skipped, outside = [], 0, 0
    allowed_roots = [local] if local.is_dir() else []
    allowed_roots.append(Path(datasets.config.HF_DATASETS_CACHE))
    for i, row in enumerate(ds):
        image, row_name = row[image_col] or {}, f"{name}#{i}"
        caption, captioned = _caption(row[caption_col], ds_cfg)
        if image.get("bytes"):
            data = image["bytes"]
            records.append(Record(_sha256(data), row_name, caption, data=data, captioned=captioned))
        elif image.get("path") and Path(image["path"]).is_file():  # e.g. imagefolder rows point at files
            if not any(inside(image["path"], allowed) for allowed in allowed_roots):
                outside += 1  # a row naming any file on the machine is not read
                continue
            data = Path(image["path"]).read_bytes()
            records.append(Record(_sha256(data), row_name, caption, path=image["path"], captioned=captioned))
        else:
            skipped += 1
    if skipped:
        log.warning("dataset.path=%s: skipped %d rows without an image", name, skipped)
    if outside:
        log.warning("dataset.path=%s: skipped %d rows whose image path lies outside the dataset", name, outside)
    if not records:
        raise ValueError(f"dataset.path={name!r} holds no images in dataset.image_column={image_col!r}")
    return records


# Split


def unique_by_key(records: list[Record]) -> dict[str, Record]:
    """One record per image content; the same copy wins whatever the input order: the smallest
    (name, caption)."""
    unique: dict[str, Record] = {}
    for r in records:
        best = unique.get(r.key)
        if best is None or (r.name, r.caption) < (best.name, best.caption):
            unique[r.key] = r
    return unique


def split_records(records: list[Record], holdout_fraction: float) -> tuple[list[Record], list[Record]]:
    """Deterministic (train, holdout) split by image content, independent of the input order.

    Duplicate images (same key) are reduced to one record first, so no image sits on both sides;
    sorted by key, the first round(n * fraction) are held out (at least one when fraction > 0 and
    n >= 2, and never all). Both lists keep the input order.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"dataset.holdout_fraction must be in [0, 1), got {holdout_fraction}")
    unique = unique_by_key(records)
    keys = sorted(unique)
    k = round(len(keys) * holdout_fraction)
    if holdout_fraction > 0 and len(keys) >= 2:
        k = min(max(k, 1), len(keys) - 1)
    held = set(keys[:k])
    train, holdout, seen = [], [], set()
    for r in records:
        if r.key not in seen and r == unique[r.key]:
            seen.add(r.key)
            (holdout if r.key in held else train).append(r)
    return train, holdout


@dataclass
class Split:
    """A dataset after preflight: every usable record, the training and held-out sides, and the
    preflight report (data_report.json)."""

    records: list[Record]
    train: list[Record]
    holdout: list[Record]
    report: dict


SPLIT_FILE = "split.json"  # in a run dir: the image keys training used and held out


def load_split(ds_cfg: DictConfig, cache_dir: str | Path, run_dir: Path | None = None, stored: Path | None = None) -> Split:
    """Records of ``ds_cfg``, decoded once (broken files skipped and listed, never touched), split
    90/10 by content. The split a run trained with is written to ``run_dir/split.json`` and read
    back from there (or from ``stored``) by a resume and by evaluation, so deleting or adding
    files later never moves a trained-on image into the held-out set. With too few usable images
    the preflight report still goes to ``run_dir``."""
    records = load_records(ds_cfg, cache_dir)
    try:
        records, report = preflight(records, ds_cfg.resolution)
    except PreflightError as err:
        if run_dir is not None:
            write_data_report(run_dir, err.report)
        raise
    if report["skipped"]:
        log.warning("%d of %d files skipped (listed in data_report.json)", len(report["skipped"]), report["n_total"])
    path = Path(run_dir) / SPLIT_FILE if run_dir is not None else stored
    if path is not None and path.is_file():
        train, holdout = _stored_split(records, json.loads(path.read_text()), path)
    else:
        train, holdout = split_records(records, ds_cfg.holdout_fraction)
        if run_dir is not None:
            write_json_atomic(path, {"train": [[r.key, r.name] for r in train], "holdout": [[r.key, r.name] for r in holdout]})
    if not train:
        raise ValueError(f"dataset {ds_cfg.name!r} leaves no training images after the hold-out split")
    return Split(records, train, holdout, report)


def _stored_split(records: list[Record], stored: dict, path: Path) -> tuple[list[Record], list[Record]]:
    """The recorded split applied to the records there are now, in the recorded order."""
    by_key = unique_by_key(records)
    sides = []
    for side in ("train", "holdout"):
        missing = [name for key, name in stored[side] if key not in by_key]
        if missing:
            log.warning("%d %s images recorded in %s are missing now (e.g. %s); using the %d left",
                        len(missing), side, path, missing[0], len(stored[side]) - len(missing))
        sides.append([by_key[key] for key, _ in stored[side] if key in by_key])
    known = {key for side in ("train", "holdout") for key, _ in stored[side]}
    new = [r.name for r in by_key.values() if r.key not in known]
    if new:
        log.warning("%d images are new since %s was written (e.g. %s); this run does not use them", len(new), path, new[0])
    return sides[0], sides[1]


def write_json_atomic(path: Path, data: Any, indent: int = 1) -> None:
    """``data`` as JSON at ``path``, through a temp file and a rename: never half-written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def report_captions(split: Split, tokenizer, run_dir: Path, write: bool = True) -> None:
    """Add caption lengths in the text encoder's tokens to the report; write data_report.json."""
    split.report["captions"] = caption_length_report(split.records, tokenizer, tokenizer.model_max_length)
    if write:
        write_data_report(run_dir, split.report)


# Decoding and preprocessing


def load_image(record: Record) -> Image.Image:
    """Decode a record to an 8-bit RGB image, upright per its EXIF orientation."""
    try:
        return _decode(record)[0]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image {record.name}: {e}") from e


def _decode(record: Record) -> tuple[Image.Image, str]:
    """(upright 8-bit RGB image, the mode it was stored in). Fully decodes, so truncation raises
    (unless PIL's ImageFile.LOAD_TRUNCATED_IMAGES was switched on; ``preflight`` switches it off)."""
    with Image.open(record.path if record.path is not None else io.BytesIO(record.data or b"")) as im:
        im.load()
        return _to_rgb(ImageOps.exif_transpose(im)), im.mode


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit grey: convert() clips values to 255, turning nearly everything white; rescale instead.
        grey = np.asarray(im).astype(np.float32) / 257.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # Transparent areas would otherwise keep whatever colour they hide (often black).
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")  # L, P, CMYK, YCbCr, 1, RGB


def prepare_image(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    random_flip: bool,
    generator: torch.Generator | None = None,
    flip: bool | None = None,
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize the short side to ``resolution``, crop a square, maybe flip; return the tensor and SDXL's
    size conditioning: (pixels [3,R,R] in [-1, 1], original (h, w), crop (top, left) after resizing).
    ``flip`` forces the flip on or off (the latent cache stores both variants); None: random.
    """
    image = image if image.mode == "RGB" else image.convert("RGB")
    w, h = image.size
    # Same sizes as torchvision's Resize(int) in the diffusers examples: long side truncated.
    if w <= h:
        new_w, new_h = resolution, int(resolution * h / w)
    else:
        new_w, new_h = int(resolution * w / h), resolution
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if center_crop:
        top, left = int(round((new_h - resolution) / 2.0)), int(round((new_w - resolution) / 2.0))
    else:
        top = int(torch.randint(0, new_h - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, new_w - resolution + 1, (1,), generator=generator))
    crop = np.array(image.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)
    pixels = torch.from_numpy(crop).permute(2, 0, 1).float() / 127.5 - 1.0
    if flip if flip is not None else random_flip and float(torch.rand((), generator=generator)) < 0.5:
        pixels = pixels.flip(-1)
        # The crop now sits mirrored in the (flipped) resized image: SDXL must see that offset.
        left = new_w - left - resolution
    return pixels.contiguous(), (h, w), (top, left)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample, per-epoch seed for augmentation (crop, flip) that doesn't depend on the order
    samples are fetched in: loaders fetch ahead of the training step, so draws from the global RNG
    would land on different sides of a checkpoint and a resumed run would augment differently."""
    return (seed * 1_000_003 + epoch) * 1_000_003 + index


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Records -> training examples; crops and flips keyed by (seed, epoch, index)."""

    def __init__(self, records: list[Record], resolution: int, center_crop: bool, random_flip: bool, seed: int = 0):
        self.records = list(records)
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i))
        pixels, original, crop = prepare_image(
            load_image(record), self.resolution, self.center_crop, self.random_flip, generator=generator
        )
        return {
            "pixel_values": pixels,
            "caption": record.caption,
            "original_size": torch.tensor(original, dtype=torch.long),
            "crop_top_left": torch.tensor(crop, dtype=torch.long),
            "key": record.key,
            "name": record.name,  # for messages about the batch (a non-finite loss names its files)
        }


class PriorPreservationDataset(torch.utils.data.Dataset):
    """DreamBooth's batches (Ruiz et al. 2023, sec. 4.2): training example i comes with class
    image i mod N, the two weighted 1 and ``prior_weight`` in the loss (``loss.batch_mean``)."""

    def __init__(self, instances: torch.utils.data.Dataset, classes: torch.utils.data.Dataset, prior_weight: float):
        self.instances, self.classes, self.prior_weight = instances, classes, prior_weight

    def set_epoch(self, epoch: int) -> None:
        self.instances.set_epoch(epoch)
        self.classes.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, i: int) -> list[dict]:
        instance, prior = self.instances[i], self.classes[i % len(self.classes)]
        instance["loss_weight"], prior["loss_weight"] = torch.tensor(1.0), torch.tensor(float(self.prior_weight))
        instance["prior"], prior["prior"] = torch.tensor(False), torch.tensor(True)
        return [instance, prior]


def collate(batch: list[dict]) -> dict:
    """Stack a list of examples into a batch: tensors stacked, captions and keys kept as lists.
    Works for pixel examples and for cached ones (latent moments, text embeddings), and for
    (instance, class) pairs, which become two rows each."""
    if batch and isinstance(batch[0], list):
        batch = [example for pair in batch for example in pair]
    return {k: torch.stack([b[k] for b in batch]) if torch.is_tensor(batch[0][k]) else [b[k] for b in batch] for k in batch[0]}


# Preflight: decode everything once before training, so a bad file costs a line in a report rather
# than a crash hours into a run.

SMALL_POLICY = "kept; upscaled to the training resolution by the normal resize"
DECODE_THREADS = 8  # Pillow's decoders release the GIL, so threads decode in parallel
DECODE_PIXEL_BUDGET = 64_000_000  # pixels decoded at once, ~1 GB of RGBA: eight 1024 px images fit many times


class PreflightError(ValueError):
    """Too few usable images. ``report`` is the preflight report, for data_report.json."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def preflight(records: list[Record], resolution: int, min_images: int = 2) -> tuple[list[Record], dict]:
    """Fully decode every record exactly as training will; return (usable records, report).

    Nothing on disk is deleted or modified. The usable records keep the input order. Policies:

    - Files that can't be decoded (truncated, corrupt, not an image, empty, unreadable, or over
      PIL's decompression-bomb pixel limit) are skipped and listed under ``skipped`` with a reason.
      Truncation is always detected: PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is held False here.
    - Images stored in another mode (CMYK, alpha, 16-bit, palette, ...) are kept and converted to
      8-bit RGB by ``load_image``; they are listed under ``converted`` with their stored mode.
    - Images whose short side is below ``resolution`` are kept and upscaled by the normal resize;
      they are listed under ``small`` (size upright, [w, h]) and the policy is stated in the report.
    - ``default_caption_used`` counts usable records without a caption of their own
      (``dataset.default_caption`` stood in); ``empty_captions`` those whose final caption is empty.

    Report: {"n_total", "n_usable", "resolution", "skipped": [{"name", "key", "reason"}],
    "converted": [{"name", "mode"}], "small": [{"name", "size"}], "small_policy",
    "default_caption_used", "empty_captions"}. Caption length needs a tokenizer: see
    ``caption_length_report``.

    Raises PreflightError (a ValueError carrying ``.report``) when fewer than ``min_images``
    records are usable.
    """
    with _strict_decoding():
        results = _decode_all(records)
    usable, skipped, converted, small = [], [], [], []
    for record, (reason, mode, size) in zip(records, results):
        if reason is not None:
            skipped.append({"name": record.name, "key": record.key, "reason": reason})
            continue
        usable.append(record)
        if mode != "RGB":
            converted.append({"name": record.name, "mode": mode})
        if min(size) < resolution:
            small.append({"name": record.name, "size": list(size)})
    report = {
        "n_total": len(records),
        "n_usable": len(usable),
        "resolution": resolution,
        "skipped": skipped,
        "converted": converted,
        "small": small,
        "small_policy": SMALL_POLICY,
        "default_caption_used": sum(not r.captioned for r in usable),
        "empty_captions": sum(not r.caption.strip() for r in usable),
    }
    _log_report(report)
    if len(usable) < min_images:
        listed = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        why = f"see the skipped list: {listed}{more}" if skipped else "no file was skipped; add more images"
        raise PreflightError(
            f"only {len(usable)} usable images of {len(records)} (need at least {min_images}); {why}", report
        )
    return usable, report


@contextmanager
def _strict_decoding() -> Iterator[None]:
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    if previous:
        log.warning("PIL ImageFile.LOAD_TRUNCATED_IMAGES is on (set by some library); preflight turns it "
                    "off while it checks, so truncated files are still found")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _decode_all(records: list[Record]) -> list[tuple[str | None, str, tuple[int, int]]]:
    """(skip reason or None, stored mode, upright (w, h)) per record; identical bytes decode once."""
    first: dict[str, Record] = {}
    for r in records:
        first.setdefault(r.key, r)
    unique = list(first.values())
    workers = max(1, min(DECODE_THREADS, os.cpu_count() or 1, len(unique)))
    budget = _PixelBudget(DECODE_PIXEL_BUDGET)
    with ThreadPoolExecutor(workers) as pool:
        by_key = dict(zip(first, pool.map(lambda r: _check(r, budget), unique)))
    return [by_key[r.key] for r in records]


class _PixelBudget:
    """At most ``limit`` pixels being decoded at once (one image of any size always may): eight
    threads each decoding a 96-Mpx PNG held 8 GB. Sizes come from the header, before decoding."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()

    @contextmanager
    def take(self, pixels: int) -> Iterator[None]:
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            with self.cond:
                self.used -= pixels
                self.cond.notify_all()


def _check(record: Record, budget: "_PixelBudget | None" = None) -> tuple[str | None, str, tuple[int, int]]:
    try:
        with budget.take(_pixels(record)) if budget else nullcontext():
            rgb, mode = _decode(record)
    except MemoryError:
        raise  # the machine's problem, not the file's
    except Exception as e:  # noqa: BLE001 - malformed files make decoders raise all sorts (struct.error, ...)
        return _skip_reason(record, e), "", (0, 0)
    return None, mode, rgb.size


def _pixels(record: Record) -> int:
    """Width x height from the header (no decoding); 0 when unreadable (the decode then says why)."""
    try:
        with Image.open(record.path if record.path is not None else io.BytesIO(record.data or b"")) as im:
            return im.width * im.height
    except Exception:  # noqa: BLE001 - any unreadable header: the full decode reports it
        return 0


def _skip_reason(record: Record, e: Exception) -> str:
    if isinstance(e, Image.DecompressionBombError):
        return "image too large (decompression bomb limit)"
    if isinstance(e, OSError) and e.errno is not None:  # the OS's error, not the decoder's
        return f"cannot read file: {e.strerror or e}"
    head, size = _head(record)
    if size == 0:
        return "empty file"
    if isinstance(e, UnidentifiedImageError):
        return "not an image (cannot identify image file)"
    # A WebP cut short fails with "could not create decoder object"; its RIFF header knows the length.
    riff = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    riff_short = riff and int.from_bytes(head[4:8], "little") + 8 > size
    if "truncated" in str(e).lower() or riff_short:
        return "truncated image"
    return f"corrupt image: {str(e) or type(e).__name__}"


def _head(record: Record) -> tuple[bytes, int]:
    """(first 12 bytes, total size) of a record's encoded image."""
    if record.path is None:
        data = record.data or b""
        return data[:12], len(data)
    try:
        with open(record.path, "rb") as f:
            return f.read(12), os.fstat(f.fileno()).st_size
    except OSError:
        return b"", -1


def _log_report(report: dict) -> None:
    skipped = report["skipped"]
    log.info("data preflight: %d of %d images usable", report["n_usable"], report["n_total"])
    for s in skipped[:10]:
        log.warning("skipping %s: %s", s["name"], s["reason"])
    if len(skipped) > 10:
        log.warning("... and %d more skipped files (all listed in data_report.json)", len(skipped) - 10)
    if report["small"]:
        log.warning("%d images are smaller than the training resolution %d; %s",
                    len(report["small"]), report["resolution"], report["small_policy"])
    if report["default_caption_used"]:
        log.warning("%d images have no caption; dataset.default_caption stands in",
                    report["default_caption_used"])
    if report["empty_captions"]:
        log.warning("%d images train with an empty caption (set dataset.default_caption or "
                    "dataset.caption_prefix)", report["empty_captions"])


CAPTION_HEAD = 4096  # characters of a caption tokenised to count its length (max_tokens: at least)


def caption_length_report(records: list[Record], tokenizer, max_length: int = 77) -> dict:
    """Captions longer than the text encoder's window: {"too_long": count of records,
    "max_tokens": the longest caption in tokens, "examples": the first 5 such record names,
    "max_length"}. Token counts include BOS/EOS, as the encoder sees them; anything past
    ``max_length`` is cut off by the truncating tokenizer at training time, so it never trains.
    Called by the trainer once the pipeline (and so the tokenizer) is loaded."""
    captions = list(dict.fromkeys(r.caption for r in records))  # many records share the default caption
    n_tokens = {}
    if captions:
        # Only the head of a huge caption: a token spans at most a few dozen characters, so
        # CAPTION_HEAD characters are far past max_length tokens (a 5 MB caption took 15 s and 1 GB).
        # verbose=False: transformers would otherwise warn about every over-long caption.
        heads = [c[:CAPTION_HEAD] for c in captions]
        ids = tokenizer(heads, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        n_tokens = {c: len(i) for c, i in zip(captions, ids)}
    long = [r for r in records if n_tokens[r.caption] > max_length]
    report = {
        "too_long": len(long),
        "max_tokens": max(n_tokens.values(), default=0),
        "examples": [r.name for r in long[:5]],
        "max_length": max_length,
    }
    if long:
        log.warning("%d captions are longer than the text encoder's %d tokens (longest %d) and will be "
                    "truncated, e.g. %s", len(long), max_length, report["max_tokens"], report["examples"][0])
    return report


def write_data_report(run_dir: Path, report: dict) -> Path:
    """Write ``report`` to ``run_dir/data_report.json`` atomically (temp file + rename); return the path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "data_report.json"
    write_json_atomic(path, report, indent=2)
    return path


# Synthetic source: two styles a LoRA can visibly learn, generated offline in milliseconds.

PASTEL_SKIES = {"pink": (248, 212, 222), "lavender": (226, 214, 244), "peach": (252, 224, 198),
                "mint": (210, 240, 224), "pale blue": (204, 226, 246)}
COMIC_COLORS = [(230, 30, 40), (255, 200, 0), (0, 160, 230), (220, 0, 150), (30, 170, 60), (255, 110, 0)]
BLACK = (0, 0, 0)


def synthetic_folder(num_images: int, resolution: int, cache_dir: str | Path) -> Path:
    """Generate (once) the synthetic set as PNG + .txt pairs under ``cache_dir``; return its folder."""
    final = Path(cache_dir).expanduser() / "synthetic" / f"{SYNTHETIC_VERSION}_{num_images}_{resolution}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temp dir and rename: a crash or a parallel run never leaves a half-written set.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        for i in range(num_images):
            image, caption = make_synthetic_image(i, resolution)
            folder = tmp / SYNTHETIC_STYLES[i % 2]  # one folder per style, as a multi-style dataset
            folder.mkdir(exist_ok=True)
            image.save(folder / f"{i:05d}.png")
            (folder / f"{i:05d}.txt").write_text(caption + "\n", encoding="utf-8")
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        # Another run finished first; its images are identical, so use them.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after a successful rename
    return final


def make_synthetic_image(index: int, resolution: int) -> tuple[Image.Image, str]:
    """Deterministic image + caption; even indices are soft watercolors, odd ones bold comic panels.

    The image is landscape (width = resolution * 5 // 4) so that cropping is exercised.
    """
    rng = np.random.RandomState(index)
    return _watercolor(rng, resolution) if index % 2 == 0 else _comic(rng, resolution)


def _watercolor(rng: np.random.RandomState, res: int) -> tuple[Image.Image, str]:
    h, w = res, res * 5 // 4
    y = np.linspace(0.0, 1.0, h)[:, None, None]
    x = (np.arange(w) / h)[None, :, None]  # in units of the height, so shapes don't stretch
    sky_name = list(PASTEL_SKIES)[rng.randint(len(PASTEL_SKIES))]
    img = np.array(PASTEL_SKIES[sky_name]) * (1 - y) + np.array([250, 246, 236]) * y
    sun_x, sun_y, sun_r = rng.uniform(0.2, 1.05), rng.uniform(0.1, 0.3), rng.uniform(0.07, 0.12)
    sun = 0.8 * np.clip((sun_r - np.hypot(x - sun_x, y - sun_y)) / 0.05 + 0.5, 0, 1)  # soft disc
    img = img * (1 - sun) + np.array([255, 244, 205]) * sun
    for layer in range(3):  # far to near: lower and darker, with wide soft edges
        crest = 0.5 + 0.13 * layer + rng.uniform(-0.03, 0.03)
        crest = crest + rng.uniform(0.03, 0.08) * np.sin(rng.uniform(3, 8) * x + rng.uniform(0, 2 * np.pi))
        alpha = 1 / (1 + np.exp(-(y - crest) / 0.03))
        color = np.array([160, 205, 170]) - 22 * layer + rng.uniform(-10, 10, 3)
        img = img * (1 - alpha) + color * alpha
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(res / 64))
    return pil, f"a watercolor landscape with soft hills, {sky_name} sky"


def _comic(rng: np.random.RandomState, res: int) -> tuple[Image.Image, str]:
    h, w = res, res * 5 // 4
    line = max(2, res // 48)  # thick outlines at any resolution
    sky, ground = (COMIC_COLORS[i] for i in rng.choice(len(COMIC_COLORS), 2, replace=False))
    img = Image.new("RGB", (w, h), sky)
    draw = ImageDraw.Draw(img)
    ground_y = int(h * 0.8)
    draw.rectangle([0, ground_y, w, h], fill=ground, outline=BLACK, width=line)
    n = int(rng.randint(3, 7))
    for x0 in np.sort(rng.uniform(0, w * 0.8, n)).astype(int):
        x1 = int(min(w - 1, x0 + rng.uniform(0.12, 0.25) * w))
        y0 = int(ground_y - rng.uniform(0.3, 0.65) * h)
        shadow = [x0 + 2 * line, y0 + 2 * line, x1 + 2 * line, ground_y]
        draw.rectangle(shadow, fill=BLACK)  # hard, offset, no gradient
        color = COMIC_COLORS[rng.randint(len(COMIC_COLORS))]
        draw.rectangle([x0, y0, x1, ground_y], fill=color, outline=BLACK, width=line)
        win = max(2, (x1 - x0) // 5)
        for wy in range(y0 + 2 * line, ground_y - win - line, 2 * win):  # a column of windows
            window = [x0 + 2 * line, wy, x0 + 2 * line + win, wy + win]
            draw.rectangle(window, fill=(255, 230, 0), outline=BLACK, width=max(1, line // 2))
    return img, f"a bold comic panel with hard shadows, {n} buildings"
