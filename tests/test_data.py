"""Dataset loading, the train/holdout split, and image preprocessing (ghibli_lab.data)."""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from PIL import Image

from ghibli_lab import data
from ghibli_lab.config import DatasetConfig
from ghibli_lab.data import (
    ImageCaptionDataset,
    Record,
    collate,
    load_image,
    load_records,
    make_synthetic_image,
    prepare_image,
    split_records,
)

from .conftest import compose_train, group_option


def make_cfg(**overrides):
    fields = {"name": "test", "source": "folder", "resolution": 64, **overrides}
    return group_option(DatasetConfig, "dataset", "folder", **fields)


def fake_records(n: int) -> list[Record]:
    return [
        Record(hashlib.sha256(str(i).encode()).hexdigest(), f"img{i}.png", f"caption {i}", path=f"img{i}.png")
        for i in range(n)
    ]


def save_image(path, color, size=(20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# split


@pytest.mark.parametrize("n", [40, 100])
def test_split_is_deterministic_disjoint_complete_and_sized(n):
    records = fake_records(n)
    train, holdout = split_records(records, 0.1)
    assert len(holdout) == round(0.1 * n)
    assert {r.key for r in train}.isdisjoint(r.key for r in holdout)
    assert sorted(train + holdout, key=lambda r: r.key) == sorted(records, key=lambda r: r.key)
    # Input order doesn't matter for membership; the output keeps the input order.
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    train2, holdout2 = split_records(shuffled, 0.1)
    assert set(train2) == set(train) and set(holdout2) == set(holdout)
    assert train2 == [r for r in shuffled if r in set(train)]


def test_split_holds_out_at_least_one_but_never_all():
    records = fake_records(2)
    assert [len(part) for part in split_records(records, 0.1)] == [1, 1]
    assert [len(part) for part in split_records(records, 0.0)] == [2, 0]
    assert split_records(fake_records(1), 0.5) == (fake_records(1), [])


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.integers(0, 15), max_size=40), seed=st.integers(0, 10**6))
def test_duplicate_images_never_sit_on_both_sides(keys, seed):
    records = [Record(f"{k:064x}", f"copy{i}.png", "c", path=f"copy{i}.png") for i, k in enumerate(keys)]
    train, holdout = split_records(records, 0.25)
    assert {r.key for r in train}.isdisjoint(r.key for r in holdout)
    out_keys = [r.key for r in train + holdout]
    assert sorted(out_keys) == sorted(set(r.key for r in records))  # one copy of each image
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    train2, holdout2 = split_records(shuffled, 0.25)
    assert set(train2) == set(train) and set(holdout2) == set(holdout)


# ----------------------------------------------------------------------------------------------
# synthetic source


def test_synthetic_set_is_deterministic_and_written_as_png_and_txt(tmp_path):
    cfg = make_cfg(source="synthetic", num_images=6, resolution=64, caption_prefix="syn, ")
    first = load_records(cfg, tmp_path / "a")
    second = load_records(cfg, tmp_path / "b")
    assert [(r.key, r.caption) for r in first] == [(r.key, r.caption) for r in second]
    folder = tmp_path / "a" / "synthetic" / "v2_6_64"
    assert len(list(folder.rglob("*.png"))) == 6 and len(list(folder.rglob("*.txt"))) == 6
    assert sorted(p.name for p in folder.iterdir()) == ["comic", "watercolor"]  # one folder per style
    assert [p.name for p in (tmp_path / "a" / "synthetic").iterdir()] == ["v2_6_64"]  # no temp dirs left
    assert all(r.caption.startswith("syn, ") for r in first)
    assert Image.open(first[0].path).size == (80, 64)  # landscape, so cropping matters
    # A second call reuses the generated folder instead of writing it again.
    mtime = (folder / "watercolor" / "00000.png").stat().st_mtime_ns
    assert load_records(cfg, tmp_path / "a") == first
    assert (folder / "watercolor" / "00000.png").stat().st_mtime_ns == mtime


def test_synthetic_generation_tolerates_a_parallel_run(tmp_path, monkeypatch):
    # Two sweep jobs may generate the same set at once: the loser of the rename uses the winner's copy.
    real_rename = data.os.rename

    def rename_after_another_run(src, dst):
        Path(dst).mkdir()
        (Path(dst) / "winner").write_text("")
        real_rename(src, dst)

    monkeypatch.setattr(data.os, "rename", rename_after_another_run)
    folder = data.synthetic_folder(2, 32, tmp_path)
    assert (folder / "winner").exists()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # the temp copy is gone


def _style_stats(image: Image.Image) -> tuple[float, float]:
    rgb = np.asarray(image, dtype=np.float32)
    saturation = (rgb.max(-1) - rgb.min(-1)) / np.maximum(rgb.max(-1), 1)
    grey = rgb.mean(-1)
    edges = np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()
    return float(saturation.mean()), float(edges)


def test_synthetic_styles_are_visually_distinct():
    images = [make_synthetic_image(i, 64) for i in range(20)]
    water = [_style_stats(im) for im, cap in images[0::2]]
    comic = [_style_stats(im) for im, cap in images[1::2]]
    assert all("watercolor" in cap for _, cap in images[0::2])
    assert all("comic" in cap for _, cap in images[1::2])
    # Every comic panel is more saturated and has stronger edges than every watercolor.
    assert min(s for s, _ in comic) > 2 * max(s for s, _ in water)
    assert min(e for _, e in comic) > 3 * max(e for _, e in water)


# ----------------------------------------------------------------------------------------------
# folder source


def test_folder_captions_from_txt_with_default_and_prefix(tmp_path):
    save_image(tmp_path / "b.png", "red")
    save_image(tmp_path / "sub" / "a.JPG", "blue")
    save_image(tmp_path / "c.webp", "green")
    (tmp_path / "b.txt").write_text("  a red square \n")
    (tmp_path / "c.txt").write_text("   ")  # empty caption -> default
    (tmp_path / "notes.md").write_text("not an image")
    cfg = make_cfg(path=str(tmp_path), caption_prefix="ghibli, ", default_caption="a picture")
    records = load_records(cfg, tmp_path / "cache")
    assert [r.path for r in records] == [str(tmp_path / n) for n in ("b.png", "c.webp", "sub/a.JPG")]
    assert [r.caption for r in records] == ["ghibli, a red square", "ghibli, a picture", "ghibli, a picture"]
    assert records[0].key == hashlib.sha256((tmp_path / "b.png").read_bytes()).hexdigest()
    assert len(load_records(make_cfg(path=str(tmp_path), num_images=2), tmp_path / "cache")) == 2


def test_folder_captions_from_metadata_jsonl(tmp_path):
    save_image(tmp_path / "a.png", "red")
    save_image(tmp_path / "sub" / "b.png", "blue")
    save_image(tmp_path / "c.png", "green")
    rows = [{"file_name": "a.png", "caption": "from jsonl"}, {"file_name": "sub/b.png", "caption": None}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cfg = make_cfg(path=str(tmp_path), caption_column="caption", default_caption="dflt")
    assert [r.caption for r in load_records(cfg, tmp_path)] == ["from jsonl", "dflt", "dflt"]


def test_folder_captions_from_metadata_csv_and_txt_wins(tmp_path):
    save_image(tmp_path / "a.png", "red")
    save_image(tmp_path / "b.png", "blue")
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,"from csv, with comma"\nb.png,csv b\n')
    (tmp_path / "b.txt").write_text("from txt")
    records = load_records(make_cfg(path=str(tmp_path)), tmp_path)
    assert [r.caption for r in records] == ["from csv, with comma", "from txt"]


def test_metadata_without_caption_column_names_the_key(tmp_path):
    save_image(tmp_path / "a.png", "red")
    (tmp_path / "metadata.csv").write_text("file_name,caption\na.png,x\n")
    with pytest.raises(ValueError, match="dataset.caption_column") as err:
        load_records(make_cfg(path=str(tmp_path)), tmp_path)
    assert "'text'" in str(err.value) and "metadata.csv" in str(err.value)


def test_folder_errors_name_the_key_and_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="dataset.path") as err:
        load_records(make_cfg(path=str(missing)), tmp_path)
    assert str(missing) in str(err.value)
    empty = tmp_path / "empty"
    (empty / ".hidden").mkdir(parents=True)
    save_image(empty / ".hidden" / "x.png", "red")  # hidden folders are skipped
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="dataset.path") as err:
        load_records(make_cfg(path=str(empty)), tmp_path)
    assert str(empty) in str(err.value) and ".png" in str(err.value)


# ----------------------------------------------------------------------------------------------
# hub source


def test_hub_id_offline_raises_offline_error(monkeypatch, tmp_path):
    from ghibli_lab.pipeline import OfflineError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "ghibli-lab-tests/no-such-dataset"
    with pytest.raises(OfflineError, match="dataset.path") as err:
        load_records(make_cfg(source="hub", path=name), tmp_path)
    assert name in str(err.value)


def test_hub_source_reads_a_save_to_disk_copy(tmp_path):
    import datasets

    blobs = [png_bytes(Image.new("RGB", (8, 8), c)) for c in ("red", "blue", "red")]
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in blobs], "text": ["one", "", "three"], "n": [1, 2, 3]}
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "copy"))
    cfg = make_cfg(source="hub", path=str(tmp_path / "copy"), default_caption="dflt", caption_prefix="p ")
    records = load_records(cfg, tmp_path)
    assert [r.caption for r in records] == ["p one", "p dflt", "p three"]
    assert [r.data for r in records] == blobs and all(r.path is None for r in records)
    assert records[0].key == records[2].key == hashlib.sha256(blobs[0]).hexdigest()
    assert records[1].name == f"{tmp_path / 'copy'}#1"
    assert np.asarray(load_image(records[1]))[0, 0].tolist() == [0, 0, 255]
    with pytest.raises(ValueError, match="dataset.caption_column='caption'") as err:
        load_records(make_cfg(source="hub", path=str(tmp_path / "copy"), caption_column="caption"), tmp_path)
    assert "['image', 'text', 'n']" in str(err.value)


def test_records_remember_whether_the_caption_was_their_own(tmp_path):
    # preflight counts the images that fell back to dataset.default_caption.
    for name in ("a.png", "b.png", "c.png", "d.png"):
        save_image(tmp_path / "folder" / name, "red")
    (tmp_path / "folder" / "a.txt").write_text("own caption")
    (tmp_path / "folder" / "b.txt").write_text(" \n")
    (tmp_path / "folder" / "metadata.jsonl").write_text('{"file_name": "c.png", "text": "from jsonl"}\n')
    cfg = make_cfg(path=str(tmp_path / "folder"), default_caption="dflt")
    assert [(r.caption, r.captioned) for r in load_records(cfg, tmp_path)] == [
        ("own caption", True), ("dflt", False), ("from jsonl", True), ("dflt", False)
    ]
    import datasets

    blob = png_bytes(Image.new("RGB", (8, 8), "red"))
    ds = datasets.Dataset.from_dict({"image": [{"bytes": blob, "path": None}] * 3, "text": ["one", "  ", None]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hub"))
    records = load_records(make_cfg(source="hub", path=str(tmp_path / "hub"), default_caption="dflt"), tmp_path)
    assert [(r.caption, r.captioned) for r in records] == [("one", True), ("dflt", False), ("dflt", False)]


# ----------------------------------------------------------------------------------------------
# decoding


def _record_of(image: Image.Image, fmt: str = "PNG", **save_kwargs) -> Record:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_kwargs)
    return Record("k", f"test.{fmt.lower()}", "", data=buf.getvalue())


def test_load_image_converts_modes_to_rgb_uint8():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent -> white, not black
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 128, 255])
    palette.putpixel((0, 0), 0)
    palette.info["transparency"] = 0  # index 0 is transparent -> white
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red ink
    grey = Image.new("L", (4, 4), 77)
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    deep.putpixel((0, 0), 32896)
    assert deep.mode == "I;16"
    cases = [
        (_record_of(rgba), (255, 255, 255), (255, 0, 0)),
        (_record_of(palette), (255, 255, 255), (0, 128, 255)),
        (_record_of(cmyk, "JPEG", quality=100), None, None),
        (_record_of(grey), (77, 77, 77), (77, 77, 77)),
        (_record_of(deep), (128, 128, 128), (255, 255, 255)),
    ]
    for record, first, other in cases:
        image = load_image(record)
        arr = np.asarray(image)
        assert image.mode == "RGB" and arr.dtype == np.uint8 and arr.shape == (4, 4, 3)
        if first is not None:
            assert tuple(arr[0, 0]) == first and tuple(arr[3, 3]) == other
    red = np.asarray(load_image(cases[2][0])).astype(int)[2, 2]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_load_image_applies_exif_orientation_and_names_bad_files(tmp_path):
    image = Image.new("RGB", (20, 10), "white")
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    assert load_image(_record_of(image, "JPEG", exif=exif)).size == (10, 20)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(Record("k", str(bad), "", path=str(bad)))


# ----------------------------------------------------------------------------------------------
# preprocessing


def _gradient_image(w: int, h: int) -> Image.Image:
    rng = np.random.RandomState(0)
    return Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))


def test_prepare_image_center_crop_shape_range_and_offsets():
    image = _gradient_image(80, 64)
    pixels, original, crop = prepare_image(image, 64, center_crop=True, random_flip=False)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert original == (64, 80) and crop == (0, 8)
    expected = torch.from_numpy(np.asarray(image)[:, 8:72].copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(pixels, expected)
    # Larger images are resized so the short side is the resolution; offsets are in resized pixels.
    pixels, original, crop = prepare_image(_gradient_image(160, 128), 64, True, False)
    assert pixels.shape == (3, 64, 64) and original == (128, 160) and crop == (0, 8)
    pixels, original, crop = prepare_image(_gradient_image(48, 96), 32, True, False)
    assert pixels.shape == (3, 32, 32) and original == (96, 48) and crop == (16, 0)


def test_prepare_image_flip_mirrors_pixels_and_crop_offset():
    image = _gradient_image(81, 64)  # 17 spare columns: the center crop is not symmetric
    base, _, base_crop = prepare_image(image, 64, center_crop=True, random_flip=False)
    assert base_crop == (0, 8)
    flips = 0
    for seed in range(16):
        pixels, _, crop = prepare_image(image, 64, True, True, torch.Generator().manual_seed(seed))
        if crop == (0, 81 - 8 - 64):
            flips += 1
            assert torch.equal(pixels, base.flip(-1))
        else:
            assert crop == base_crop and torch.equal(pixels, base)
    assert 0 < flips < 16


def test_prepare_image_random_crop_is_seeded_and_in_bounds():
    image = _gradient_image(100, 64)
    arr = np.asarray(image)
    lefts = set()
    for seed in range(10):
        a = prepare_image(image, 64, False, False, torch.Generator().manual_seed(seed))
        b = prepare_image(image, 64, False, False, torch.Generator().manual_seed(seed))
        assert torch.equal(a[0], b[0]) and a[2] == b[2]
        top, left = a[2]
        assert top == 0 and 0 <= left <= 36
        expected = torch.from_numpy(arr[:, left : left + 64].copy()).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.allclose(a[0], expected)
        lefts.add(left)
    assert len(lefts) > 1


def test_dataset_and_collate_shapes(tmp_path):
    records = load_records(make_cfg(source="synthetic", num_images=5, resolution=32), tmp_path)
    dataset = ImageCaptionDataset(records, 32, center_crop=False, random_flip=True)
    torch.manual_seed(0)
    first = [dataset[i] for i in range(len(dataset))]
    torch.manual_seed(0)
    again = [dataset[i] for i in range(len(dataset))]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first, again))
    assert first[0]["original_size"].tolist() == [32, 40] and first[0]["key"] == records[0].key
    batch = collate(first[:4])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["original_size"].shape == (4, 2) and batch["original_size"].dtype == torch.long
    assert batch["crop_top_left"].shape == (4, 2) and batch["crop_top_left"].dtype == torch.long
    assert batch["caption"] == [r.caption for r in records[:4]]
    assert batch["key"] == [r.key for r in records[:4]]


def test_dataset_style_selects_one_style_folder(tmp_path):
    cfg = compose_train(["dataset=synthetic", "dataset.num_images=8"]).dataset
    both = load_records(cfg, tmp_path)
    comic = load_records(OmegaConf.merge(cfg, {"style": "comic"}), tmp_path)
    watercolor = load_records(OmegaConf.merge(cfg, {"style": "watercolor"}), tmp_path)
    assert len(comic) == len(watercolor) == 4 and {r.key for r in comic + watercolor} == {r.key for r in both}
    assert all("comic panel" in r.caption for r in comic) and all("watercolor" in r.caption for r in watercolor)
    with pytest.raises(FileNotFoundError, match="dataset.style='oil': no folder .*; the styles there: comic, watercolor"):
        load_records(OmegaConf.merge(cfg, {"style": "oil"}), tmp_path)
