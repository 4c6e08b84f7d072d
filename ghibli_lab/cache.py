"""A disk cache of VAE latents and text-encoder outputs, shared by every run of a sweep.

Entries are keyed by content: the image bytes' hash, the model (and VAE) identity, resolution,
crop and flip for latents; the caption and the model for text. Never by dataloader step: a
step-keyed cache under shuffling pairs latents with the wrong captions (a live bug class in the
diffusers examples). Any change to a part of a key is simply another entry. Each entry is one
safetensors file written to a temp name and renamed, so concurrent jobs never see half a file.

Latents are stored as the VAE posterior's moments (mean and log-variance), not as one sample, so
training draws a fresh latent sample every step exactly as the uncached path does.

Caching needs a deterministic crop: with ``dataset.center_crop=false`` (random crops) images are
encoded every step instead. Random flips are cached as both variants, one picked per step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ghibli_lab.data import ImageCaptionDataset, PriorPreservationDataset, Record, Split, load_image, prepare_image, sample_seed
from ghibli_lab.encode import encode_text, offload_encoders
from ghibli_lab.hub import model_fingerprint
from ghibli_lab.methods import trains_text_encoders

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # bump when what is stored (or how it is computed) changes


def fingerprint(model_cfg: DictConfig, dtype: torch.dtype) -> dict:
    """What the encoders' outputs depend on besides the inputs: the model's weights (a local
    directory's files, a hub revision; not just its name) and the text encoders' dtype. Latents
    don't depend on the training precision: the VAE always encodes in fp32."""
    return {"v": CACHE_VERSION, **model_fingerprint(model_cfg), "dtype": str(dtype)}


def entry_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def build_datasets(
    pipe: DiffusionPipeline, split: Split, cfg: DictConfig, dtype: torch.dtype, accelerator, class_images: list[Record] = ()
) -> tuple[Dataset, Dataset, dict]:
    """Training and held-out datasets: from the shared cache when it can stand in for the encoders
    (then the VAE and frozen text encoders leave the device until sampling), else pixels and
    captions encoded every step. With DreamBooth's ``class_images``, every training example comes
    paired with a class image (``PriorPreservationDataset``). Returns the datasets and what the
    cache did, for summary.json."""
    ds = cfg.dataset
    plan = cache_plan(ds, cfg) if cfg.train.cache else {"latents": False, "text": False}
    stats = {"latents": plan["latents"], "text": plan["latents"] and plan["text"], "encoded": 0, "reused": 0}
    if not plan["latents"]:
        log.info("no latent cache (train.cache=%s, dataset.center_crop=%s)", cfg.train.cache, ds.center_crop)
        train_set = ImageCaptionDataset(split.train, ds.resolution, ds.center_crop, ds.random_flip, seed=cfg.seed)
        val_set = ImageCaptionDataset(split.holdout, ds.resolution, center_crop=True, random_flip=False)
        class_set = ImageCaptionDataset(class_images, ds.resolution, ds.center_crop, ds.random_flip, seed=cfg.seed + 1)
    else:
        model_fp = fingerprint(cfg.model, dtype)
        flips = (False, True) if ds.random_flip else (False,)
        root = Path(cfg.cache_dir) / "encoded"
        with accelerator.main_process_first():  # one process encodes, the others then reuse
            train_set = CachedDataset(encode_records(pipe, split.train, ds, root, model_fp, flips, plan["text"], stats), seed=cfg.seed)
            val_set = CachedDataset(encode_records(pipe, split.holdout, ds, root, model_fp, (False,), plan["text"], stats))
            class_set = CachedDataset(encode_records(pipe, class_images, ds, root, model_fp, flips, plan["text"], stats), seed=cfg.seed + 1)
        offload_encoders(pipe, text=plan["text"])
        log.info("cache: %d entries encoded, %d reused", stats["encoded"], stats["reused"])
    if class_images:
        train_set = PriorPreservationDataset(train_set, class_set, cfg.method.prior_loss_weight)
    return train_set, val_set, stats


def cache_plan(ds_cfg: DictConfig, cfg: DictConfig) -> dict:
    """Which encoders the cache can stand in for, and why not when it can't."""
    return {
        "latents": bool(ds_cfg.center_crop),
        "text": not trains_text_encoders(cfg),  # a trained text encoder changes its own outputs
    }


def encode_records(
    pipe: DiffusionPipeline,
    records: list[Record],
    ds_cfg: DictConfig,
    cache_root: Path,
    model_fp: dict,
    flips: tuple[bool, ...],
    text: bool,
    stats: dict,
) -> list[dict]:
    """Make sure every record's latents (per flip variant) and, if ``text``, caption embeddings are
    cached; return one dict of entry paths and size conditioning per record. ``stats`` counts
    ``encoded`` and ``reused`` entries."""
    latents_dir, text_dir = cache_root / "latents", cache_root / "text"
    latents_dir.mkdir(parents=True, exist_ok=True)
    text_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    if pipe.vae.dtype != torch.float32:
        raise ValueError(f"the VAE must encode cached latents in float32, not {pipe.vae.dtype}")
    latent_fp = {**model_fp, "dtype": "float32"}  # the VAE's, whatever the training precision
    for record in tqdm(records, desc="cache", leave=False, disable=len(records) < 32):
        entry = {"latents": [], "text": None}
        for flip in flips:
            key = entry_key(model=latent_fp, image=record.key, res=ds_cfg.resolution, crop="center", flip=flip)
            path = latents_dir / f"{key}.safetensors"
            if not _readable(path):
                pixels, original_size, crop = prepare_image(load_image(record), ds_cfg.resolution, True, False, flip=flip)
                with torch.no_grad():
                    moments = pipe.vae.encode(pixels[None].to(pipe.vae.device, pipe.vae.dtype)).latent_dist.parameters
                _atomic_save(
                    path,
                    {
                        "latent_moments": moments[0].float().cpu(),
                        "original_size": torch.tensor(original_size),
                        "crop_top_left": torch.tensor(crop),
                    },
                )
                stats["encoded"] += 1
            else:
                stats["reused"] += 1
            entry["latents"].append(path)
        if text:
            key = entry_key(model=model_fp, caption=record.caption)
            path = text_dir / f"{key}.safetensors"
            if not _readable(path):
                with torch.no_grad():
                    embeds, pooled = encode_text(pipe, [record.caption])
                tensors = {"prompt_embeds": embeds[0].float().cpu()}
                if pooled is not None:
                    tensors["pooled_prompt_embeds"] = pooled[0].float().cpu()
                _atomic_save(path, tensors)
                stats["encoded"] += 1
            else:
                stats["reused"] += 1
            entry["text"] = path
        entry["caption"] = record.caption
        entry["key"] = record.key
        entry["name"] = record.name
        entries.append(entry)
    return entries


class CachedDataset(Dataset):
    """Training samples from the cache: latent moments (a random flip variant), size
    conditioning, and the caption's embeddings when cached (else the caption).

    The flip is drawn from a generator keyed by (seed, epoch, index), as in ImageCaptionDataset.
    """

    def __init__(self, entries: list[dict], seed: int = 0):
        self.entries = entries
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        entry = self.entries[i]
        variants = entry["latents"]
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i))
        pick = int(torch.randint(len(variants), (), generator=generator)) if len(variants) > 1 else 0
        item = load_file(variants[pick])
        item["caption"] = entry["caption"]
        item["key"] = entry["key"]
        item["name"] = entry["name"]
        if entry["text"] is not None:
            item.update(load_file(entry["text"]))
        return item


def _readable(path: Path) -> bool:
    """Whether a cache entry can be used: it opens, and its tensors still hash to the checksum
    written with them. A file damaged by something else (a full disk, a bad copy, a payload
    zeroed under an intact header) is re-encoded, not trusted."""
    if not path.is_file():
        return False
    try:
        with safe_open(path, "pt") as f:
            expected = (f.metadata() or {}).get("sha256")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        log.warning("cache entry %s is unreadable; re-encoding it", path)
        return False
    if not tensors or expected != _digest(tensors):
        log.warning("cache entry %s does not match its checksum; re-encoding it", path)
        return False
    return True


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, tmp, metadata={"sha256": _digest(tensors)})
    os.replace(tmp, path)
