"""The method axis (``conf/method/``): what a run trains, how it is saved, and how a saved run is
put back onto a pipeline for evaluation and ``generate``.

=================  ====================================  ===============================================
method.weights     trains                                saved in the run dir as
=================  ====================================  ===============================================
lora, dora         peft adapters (``adapters.py``)       ``lora/``: diffusers + kohya files
full               the UNet (and the text encoders)      ``full/unet/`` (``full/text_encoder*/``):
                                                         diffusers folders, safetensors
embeddings         new token rows of the text encoders   ``embeddings/<name>.safetensors``: A1111/ComfyUI
=================  ====================================  ===============================================

DreamBooth is not a kind of weights: it is a trigger in every caption plus prior preservation on
class images (``class_records``), over lora or full weights. A method's ``trigger`` is prepended to
the captions it trains on and to every prompt sampled with its weights, never to the base model's.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ghibli_lab.adapters import (
    BASE_COMPONENTS,
    TEXT_ENCODERS,
    TRAINED_COMPONENTS,
    attach_lora,
    canonical_header,
    current_umask,
    freeze,
    loaded_adapter,
    save_lora,
    without_adapter,
)
from ghibli_lab.config import CONF_DIR
from ghibli_lab.data import Record, Split
from ghibli_lab.hub import model_fingerprint
from ghibli_lab.pipeline import is_sdxl
from ghibli_lab.sampling import generate

log = logging.getLogger(__name__)

WEIGHTS_DIRS = {"lora": "lora", "dora": "lora", "full": "full", "embeddings": "embeddings"}
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
EMBEDDING_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # SDXL files, as A1111/ComfyUI name them
SD15_EMBEDDING_KEY = "emb_params"  # A1111's key for a single-encoder embedding
# What runs written before the method axis trained (their .hydra/config.yaml has no method).
LORA_METHOD = Path(CONF_DIR) / "method" / "lora.yaml"


def run_method(run_cfg: DictConfig) -> DictConfig:
    """A training config's method (LoRA for runs from before the method axis)."""
    method = OmegaConf.select(run_cfg, "method")
    return method if method is not None else OmegaConf.load(LORA_METHOD)


def weights_dir(run_dir: Path, run_cfg: DictConfig) -> Path:
    """Where a run's trained weights are (they exist once training has finished)."""
    return Path(run_dir) / WEIGHTS_DIRS[run_method(run_cfg).weights]


def trains_text_encoders(cfg: DictConfig) -> bool:
    """Whether training changes the text encoders' outputs (then text embeddings can't be cached)."""
    m = cfg.method
    if m.weights in ("lora", "dora"):
        return bool(cfg.lora.text_encoder)
    return m.weights == "embeddings" or (m.weights == "full" and m.full_text_encoders)


def learning_rate(cfg: DictConfig) -> float:
    return cfg.method.lr if cfg.method.lr is not None else cfg.train.lr


# ----------------------------------------------------------------------------------------------
# Training: captions, class images, the trainable weights


def placeholder_tokens(m: DictConfig) -> list[str]:
    """``<tok>``, ``<tok>_1``, ...: one token per vector, named as diffusers' loader names them."""
    return [m.token] + [f"{m.token}_{i}" for i in range(1, m.num_vectors)]


def prompt_text(m: DictConfig, text: str) -> str:
    """``text`` as these weights are prompted: the trigger in front. (A multi-vector token is
    spelled out as its vectors' tokens where the text is encoded: ``encode.encode_text`` and the
    pipelines both call diffusers' ``maybe_convert_prompt``.)"""
    return m.trigger + text


def with_trigger(split: Split, m: DictConfig) -> Split:
    """The split with the method's trigger on every caption (the held-out side too: validation
    scores the model as it is prompted)."""
    if not m.trigger:
        return split

    def add(records: list[Record]) -> list[Record]:
        return [dataclasses.replace(r, caption=prompt_text(m, r.caption)) for r in records]

    return dataclasses.replace(split, train=add(split.train), holdout=add(split.holdout))


def attach(pipe: DiffusionPipeline, cfg: DictConfig) -> list[torch.nn.Parameter]:
    """Freeze the pipeline and make the method's weights trainable; return them."""
    m = cfg.method
    if m.weights in ("lora", "dora"):
        return attach_lora(pipe, cfg.lora, dora=m.weights == "dora")
    freeze(pipe)
    if m.weights == "full":
        names = ["unet"] + ([n for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None] if m.full_text_encoders else [])
        # The base copies stay on the CPU, for the base rows of sample grids (without_adapter).
        setattr(pipe, BASE_COMPONENTS, {n: copy.deepcopy(getattr(pipe, n)).to("cpu") for n in names})
        setattr(pipe, TRAINED_COMPONENTS, tuple(names))
        return [p for n in names for p in getattr(pipe, n).requires_grad_(True).parameters()]
    return attach_embeddings(pipe, m)


class TokenEmbedding(torch.nn.Module):
    """A text encoder's token table plus trainable rows for new tokens: ids below the base
    vocabulary read the frozen table, the new ids read ``new``. Only ``new`` trains, so the
    optimizer holds num_vectors x width numbers, not the vocabulary (49408 x 1280 on SDXL)."""

    def __init__(self, base: torch.nn.Embedding, new: torch.Tensor):
        super().__init__()
        self.base = base
        self.new = torch.nn.Parameter(new)

    @property
    def weight(self) -> torch.Tensor:  # for code that reads the table (loaders, resizing)
        return torch.cat([self.base.weight, self.new.to(self.base.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.base.num_embeddings
        out = self.base(ids.clamp(max=n - 1))
        extra = F.embedding((ids - n).clamp(min=0), self.new).to(out.dtype)
        return torch.where((ids >= n).unsqueeze(-1), extra, out)


def attach_embeddings(pipe: DiffusionPipeline, m: DictConfig) -> list[torch.nn.Parameter]:
    """Add ``method.token`` (num_vectors tokens) to every tokenizer, each vector starting as the
    embedding of ``method.init_word`` (the mean of its tokens' rows when it is several tokens)."""
    tokens, params = placeholder_tokens(m), []
    for encoder_name, tokenizer_name in TOKENIZERS.items():
        encoder, tokenizer = getattr(pipe, encoder_name, None), getattr(pipe, tokenizer_name, None)
        if encoder is None:
            continue
        table = encoder.get_input_embeddings()
        if len(tokenizer) != table.num_embeddings:
            raise ValueError(f"{tokenizer_name} has {len(tokenizer)} tokens but {encoder_name} {table.num_embeddings} rows")
        init_ids = tokenizer(m.init_word, add_special_tokens=False).input_ids
        if tokenizer.add_tokens(tokens) != len(tokens):
            raise ValueError(f"method.token={m.token!r} is already a token of {tokenizer_name}: pick a new one, e.g. <my-style>")
        if not init_ids:
            raise ValueError(f"method.init_word={m.init_word!r} has no tokens")
        init = table.weight[init_ids].detach().float().mean(0)
        module = TokenEmbedding(table, init.repeat(len(tokens), 1))
        encoder.set_input_embeddings(module)
        params.append(module.new)
    setattr(pipe, TRAINED_COMPONENTS, tuple(n for n in TOKENIZERS if getattr(pipe, n, None) is not None))
    return params


def class_records(pipe: DiffusionPipeline, cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> list[Record]:
    """DreamBooth's class images, generated by the base model (call it before ``attach``), on
    ``device`` under ``dtype`` autocast.
    One PNG per seed 0..N-1 under ``<cache_dir>/class_images/<key>/``, the key covering the model
    weights, prompt and sampling settings: every run of a sweep, and later sweeps, reuse them, and
    asking for more images generates only the missing ones."""
    m = cfg.method
    if m.prior_loss_weight == 0:
        return []
    settings = dict(scheduler=cfg.scheduler.name, steps=cfg.scheduler.steps, guidance_scale=float(cfg.guidance.scale), resolution=cfg.dataset.resolution)
    key = hashlib.sha256(json.dumps({"model": model_fingerprint(cfg.model), "prompt": m.class_prompt, **settings}, sort_keys=True).encode()).hexdigest()[:24]
    folder = Path(cfg.cache_dir) / "class_images" / key
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{seed:05d}.png" for seed in range(m.num_class_images)]
    missing = [seed for seed, path in enumerate(paths) if not path.is_file()]
    if missing:
        log.info("generating %d class images for %r into %s", len(missing), m.class_prompt, folder)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        pipe.to(device)
        with torch.random.fork_rng(devices=[]), autocast:
            for seed in missing:
                (image,) = generate(pipe, [m.class_prompt], [seed], **settings)
                tmp = paths[seed].with_suffix(f".tmp-{os.getpid()}")
                image.save(tmp, format="PNG")
                os.replace(tmp, paths[seed])  # whole files only, however the run ends
    else:
        log.info("reusing %d class images in %s", len(paths), folder)
    return [
        Record(key=hashlib.sha256(p.read_bytes()).hexdigest(), name=str(p), caption=m.class_prompt, path=str(p))
        for p in paths
    ]


# ----------------------------------------------------------------------------------------------
# Saving


def save(pipe: DiffusionPipeline, cfg: DictConfig, run_dir: Path, dtype: torch.dtype) -> dict[str, Path]:
    """Export the trained weights into ``run_dir/<weights dir>`` in ``dtype``; return the files."""
    m = cfg.method
    out_dir = Path(run_dir) / WEIGHTS_DIRS[m.weights]
    if m.weights in ("lora", "dora"):
        return save_lora(pipe, out_dir, dtype=dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = save_full(pipe, out_dir, dtype) if m.weights == "full" else save_embeddings(pipe, m, out_dir, dtype)
    for path in files.values():
        os.chmod(path, 0o666 & ~current_umask())
    return files


def save_full(pipe: DiffusionPipeline, out_dir: Path, dtype: torch.dtype) -> dict[str, Path]:
    """Each fully trained component as a diffusers/transformers folder (config + safetensors),
    loadable with ``from_pretrained`` and usable as a pipeline's ``unet=`` / ``text_encoder=``."""
    files = {}
    for name in getattr(pipe, BASE_COMPONENTS):
        module, folder = getattr(pipe, name), out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
        if name == "unet":
            module.save_config(folder)
            weights = folder / "diffusion_pytorch_model.safetensors"
        else:
            module.config.save_pretrained(folder)
            weights = folder / "model.safetensors"
        save_file(state, weights, metadata={"format": "pt"})
        canonical_header(weights)
        files[name] = weights
    return files


def embedding_name(token: str) -> str:
    """The file name of an embedding: A1111 triggers an embedding by its file's name."""
    return re.sub(r"[^A-Za-z0-9._-]", "", token) or "embedding"


def save_embeddings(pipe: DiffusionPipeline, m: DictConfig, out_dir: Path, dtype: torch.dtype) -> dict[str, Path]:
    """The new rows in the A1111/ComfyUI format: ``emb_params`` [vectors, 768] for SD 1.5;
    ``clip_l`` [vectors, 768] and ``clip_g`` [vectors, 1280] for SDXL. The header names the token."""
    rows = {
        name: pipe.components[name].get_input_embeddings().new.detach().to("cpu", dtype).contiguous()
        for name in TOKENIZERS
        if pipe.components.get(name) is not None
    }
    tensors = {EMBEDDING_KEYS[n]: v for n, v in rows.items()} if is_sdxl(pipe) else {SD15_EMBEDDING_KEY: rows["text_encoder"]}
    path = out_dir / f"{embedding_name(m.token)}.safetensors"
    save_file(tensors, path, metadata={"token": m.token, "init_word": m.init_word, "num_vectors": str(m.num_vectors)})
    canonical_header(path)
    return {"embeddings": path}


# ----------------------------------------------------------------------------------------------
# Reloading a finished run onto a (base) pipeline


def weights_kind(path: Path) -> str:
    """What a saved file or folder holds: "full" (a folder with unet/), "embeddings" (a
    safetensors file of emb_params / clip_l / clip_g rows) or "lora" (anything else)."""
    path = Path(path)
    if path.is_dir():
        if (path / "unet").is_dir():
            return "full"
        files = sorted(path.glob("*.safetensors"))
        return weights_kind(files[0]) if len(files) == 1 else "lora"
    if path.suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            if set(f.keys()) <= {SD15_EMBEDDING_KEY, *EMBEDDING_KEYS.values()}:
                return "embeddings"
    return "lora"


def embedding_token(path: Path) -> str:
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("token") or f"<{path.stem}>"


@contextmanager
def applied(pipe: DiffusionPipeline, path: Path, adapter_name: str = "candidate") -> Iterator[DiffusionPipeline]:
    """``pipe`` with the saved weights at ``path`` (a run's weights dir, or a file) inside the
    block; the pipeline is as before after it. Inside, ``without_adapter`` gives the base model."""
    path = Path(path)
    kind = weights_kind(path)
    if kind == "lora":
        with loaded_adapter(pipe, path, adapter_name=adapter_name):
            yield pipe
    elif kind == "full":
        with full_weights(pipe, path):
            yield pipe
    else:
        with embeddings(pipe, path):
            yield pipe


FULL_WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


@contextmanager
def full_weights(pipe: DiffusionPipeline, folder: Path) -> Iterator[DiffusionPipeline]:
    """A full fine-tune's components in place of the pipeline's: each built from the base
    component's config (without any LoRA loaded into it) with the saved weights loaded strictly.
    Not ``from_pretrained``: transformers' loader builds text encoders that sample SDXL images
    1/255 off from the trained ones, where this reproduces them exactly."""
    originals = {}
    for name in ("unet", *TEXT_ENCODERS):
        if not (folder / name).is_dir():
            continue
        original = getattr(pipe, name)
        param = next(original.parameters())
        with torch.random.fork_rng(devices=[]):  # the constructor's random init draws from the global RNG
            trained = UNet2DConditionModel.from_config(original.config) if name == "unet" else type(original)(original.config)
        state = load_file(folder / name / FULL_WEIGHT_FILES[name])
        trained.load_state_dict({k: v.to(param.dtype) for k, v in state.items()})
        setattr(pipe, name, trained.to(param.device, param.dtype).eval())
        originals[name] = original
    if not originals:
        raise FileNotFoundError(f"no unet/ or text_encoder*/ folder in {folder}")
    setattr(pipe, BASE_COMPONENTS, originals)
    try:
        yield pipe
    finally:
        delattr(pipe, BASE_COMPONENTS)
        for name, original in originals.items():
            setattr(pipe, name, original)


@contextmanager
def embeddings(pipe: DiffusionPipeline, path: Path) -> Iterator[DiffusionPipeline]:
    """Load an embedding file into each text encoder with diffusers' loader (SDXL: clip_l into
    the first, clip_g into the second), unload it after."""
    if path.is_dir():
        (path,) = sorted(path.glob("*.safetensors"))
    state, token = load_file(path), embedding_token(path)
    loaded = []
    try:
        for name, tokenizer_name in TOKENIZERS.items():
            encoder = getattr(pipe, name, None)
            if encoder is None:
                continue
            key = EMBEDDING_KEYS[name] if is_sdxl(pipe) else SD15_EMBEDDING_KEY
            if key not in state:
                raise ValueError(f"{path} has no {key!r} embedding for {name}; it holds {sorted(state)}")
            tokenizer = getattr(pipe, tokenizer_name)
            pipe.load_textual_inversion(state[key], token=token, text_encoder=encoder, tokenizer=tokenizer)
            loaded.append((name, tokenizer_name))
        yield pipe
    finally:
        n = len(next(iter(state.values())))
        tokens = [token] + [f"{token}_{i}" for i in range(1, n)]
        for name, tokenizer_name in loaded:
            pipe.unload_textual_inversion(tokens, tokenizer=getattr(pipe, tokenizer_name), text_encoder=getattr(pipe, name))
