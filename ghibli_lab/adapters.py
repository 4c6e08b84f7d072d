"""LoRA and DoRA adapters (peft): attach, save (in the formats people load), load; and switching
off whatever a pipeline has trained (``without_adapter``), which every method shares.

- ``pytorch_lora_weights.safetensors``: diffusers/PEFT format, for ``load_lora_weights``.
- ``lora_kohya.safetensors``: ``lora_unet_*`` / ``lora_te*_*`` keys with ``.alpha`` (and DoRA's
  ``.dora_scale``), the format ComfyUI and A1111 load (they ignore diffusers-format keys).

The other methods (full fine-tune, textual inversion, DreamBooth) live in ``methods.py``.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from omegaconf import DictConfig
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from ghibli_lab.pipeline import is_sdxl

ADAPTER = "default"  # name PEFT gives the adapter we train
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# A fully fine-tuned pipeline keeps its base components here, {name: module}, for without_adapter.
BASE_COMPONENTS = "_ghibli_lab_base_components"
# The names of the components a full fine-tune or textual inversion trains (adapted_models).
TRAINED_COMPONENTS = "_ghibli_lab_trained_components"


def freeze(pipe: DiffusionPipeline) -> None:
    for name in ("unet", "vae", *TEXT_ENCODERS):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)


def attach_lora(pipe: DiffusionPipeline, lora_cfg: DictConfig, dora: bool = False) -> list[torch.nn.Parameter]:
    """Freeze every weight, add LoRA (DoRA with ``dora``) to the UNet, and to the text encoders if
    ``lora.text_encoder``; return the adapter params."""
    freeze(pipe)
    common = dict(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout, use_dora=dora)
    # Gaussian A and zero B (as in the diffusers LoRA scripts): the adapter starts as a no-op.
    pipe.unet.add_adapter(
        LoraConfig(init_lora_weights="gaussian", target_modules=list(lora_cfg.target_modules), **common)
    )
    if lora_cfg.text_encoder:
        for name in TEXT_ENCODERS:
            encoder = getattr(pipe, name, None)
            if encoder is not None:
                encoder.add_adapter(
                    LoraConfig(
                        init_lora_weights="gaussian",
                        target_modules=list(lora_cfg.text_encoder_target_modules),
                        **common,
                    )
                )
    return [p for model in adapted_models(pipe).values() for p in model.parameters() if p.requires_grad]


def adapted_models(pipe: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    """The pipeline components being trained, by component name: those ``methods.attach`` marked
    (a full fine-tune's UNet, textual inversion's encoders), else those carrying our adapter."""
    marked = getattr(pipe, TRAINED_COMPONENTS, ())
    models = {}
    for name in ("unet", *TEXT_ENCODERS):
        model = getattr(pipe, name, None)
        if model is not None and (name in marked or ADAPTER in getattr(model, "peft_config", {})):
            models[name] = model
    return models


def lora_models(pipe: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    """The components that carry our LoRA/DoRA adapter."""
    return {n: m for n, m in adapted_models(pipe).items() if ADAPTER in getattr(m, "peft_config", {})}


# What a loader needs to rebuild the adapter (diffusers passes these to peft.LoraConfig). PEFT 0.21's
# full to_dict() has fields that older PEFT versions refuse ("unexpected keyword argument").
METADATA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_dora", "use_rslora")


def adapter_metadata(model: torch.nn.Module) -> dict:
    config = model.peft_config[ADAPTER].to_dict()
    metadata = {k: config[k] for k in METADATA_FIELDS if k in config}
    if isinstance(metadata.get("target_modules"), (set, list, tuple)):
        metadata["target_modules"] = sorted(metadata["target_modules"])  # the same bytes every time
    return metadata


def save_lora(pipe: DiffusionPipeline, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Write the adapter in diffusers and kohya format, in ``dtype``, into ``out_dir``; return both
    paths. Identical weights give identical bytes, and the files are readable as the umask allows
    (safetensors' temp-file write leaves 0600, which a ComfyUI server running as another user
    can't read)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = lora_models(pipe)
    layers, metadata = {}, {}
    for name, model in models.items():
        # PEFT keys (lora_A/lora_B) as they are. convert_state_dict_to_diffusers rewrites only the
        # attention keys (to lora.down/up) and leaves conv/proj keys alone; load_lora_weights then
        # reads the mixed file as PEFT format and silently drops every attention weight.
        state = {k: v.detach().to(dtype) for k, v in get_peft_model_state_dict(model).items()}
        if name in TEXT_ENCODERS:
            # The CLIP layout every loader knows (text_model.encoder...): transformers 5 dropped the
            # text_model level, and diffusers strips it again when the loading model lacks it.
            state = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in state.items()}
            # DoRA: transformers' adapter loader (which diffusers uses for text encoders) puts the
            # adapter name before a key's last part and expects `lora_magnitude_vector.<name>.weight`;
            # a bare `lora_magnitude_vector` key is reported unexpected and the magnitude left at
            # its initial value. The UNet's loader (peft) reads both spellings.
            state = {f"{k}.weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in state.items()}
        layers[f"{name}_lora_layers"] = state
        # Without the adapter metadata, save_lora_weights drops lora_alpha and a reload uses
        # alpha = rank: a different adapter whenever alpha != rank (stack-facts, "Saving loses alpha").
        metadata[f"{name}_lora_adapter_metadata"] = adapter_metadata(model)
    type(pipe).save_lora_weights(out_dir, **layers, **metadata, safe_serialization=True)

    kohya_path = out_dir / KOHYA_FILE
    tensors = {k: v.to(dtype) for k, v in kohya_state_dict(pipe).items()}
    save_file(tensors, kohya_path, metadata=kohya_metadata(pipe))
    paths = {"diffusers": out_dir / DIFFUSERS_FILE, "kohya": kohya_path}
    for path in paths.values():
        canonical_header(path)
        os.chmod(path, 0o666 & ~current_umask())
    return paths


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def canonical_header(path: Path) -> None:
    """Sort a safetensors file's ``__metadata__`` in place. safetensors writes it from a hash map,
    in a different order in every process, so identical weights would give different bytes.
    Reordering keeps the header's length, so only those bytes are rewritten."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # never: the same content in another order
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))  # safetensors pads its header with spaces


def kohya_state_dict(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """The adapter with kohya keys and the *configured* alpha per module.

    diffusers' convert_state_dict_to_kohya writes every ``.alpha`` as the rank, because a PEFT
    state dict carries no alpha; with alpha != rank that file would load as a different adapter.
    """
    sd15 = not is_sdxl(pipe)
    out = {}
    for name, model in lora_models(pipe).items():
        peft_sd = {f"{name}.{k}": v for k, v in get_peft_model_state_dict(model).items()}
        alpha = float(model.peft_config[ADAPTER].lora_alpha)
        peft_sd, magnitudes = split_magnitudes(peft_sd)
        for key, value in [*convert_state_dict_to_kohya(peft_sd).items(), *magnitudes.items()]:
            if key.endswith(".alpha"):
                value = torch.tensor(alpha)
            if name in TEXT_ENCODERS and "_text_model_" not in key:
                # transformers 5 dropped CLIPTextModel's ``text_model`` level; ComfyUI and A1111
                # map keys from the original layout (lora_te1_text_model_encoder_layers_0_...).
                key = key.replace("_encoder_layers_", "_text_model_encoder_layers_", 1)
            if sd15:  # SD 1.x tools name the only text encoder lora_te_, not lora_te1_
                key = key.replace("lora_te1_", "lora_te_", 1)
            out[key] = value.detach().to("cpu", torch.float32).contiguous()
    return out


def split_magnitudes(peft_sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """DoRA's magnitude vectors out of a PEFT state dict, renamed as kohya-format ``.dora_scale``
    keys (``<name>.<module>.lora_magnitude_vector`` -> the module's ``lora_down`` prefix +
    ``.dora_scale``), reshaped to one value per output row: ``[out, 1]`` for a Linear,
    ``[out, 1, 1, 1]`` for a Conv2d. ComfyUI picks the decomposition axis by
    ``dora_scale.shape[0] == weight.shape[0]``; peft's ``[out]`` (Linear) would broadcast wrongly
    and its ``[1, out, 1, 1]`` (Conv2d) would select the input axis.

    The values are peft's: the magnitude m in W' = m * (W + s*BA) / ||W + s*BA||_row (Liu et al.
    2024, eq. 5), as LyCORIS' output-axis DoRA defines it. (ComfyUI's output-axis branch divides by
    ||W||_row instead, comfyanonymous/ComfyUI#12938 and PR #15458; we write the defined value.)"""
    rest, magnitudes = {}, {}
    for key, value in peft_sd.items():
        if not key.endswith(".lora_magnitude_vector"):
            rest[key] = value
            continue
        module = key[: -len(".lora_magnitude_vector")]
        probe = convert_state_dict_to_kohya({f"{module}.lora_A.weight": value})  # the module's kohya name
        prefix = next(iter(probe)).split(".lora_down")[0]
        flat = value.reshape(-1)
        shape = (flat.numel(), 1, 1, 1) if value.dim() == 4 else (flat.numel(), 1)
        magnitudes[f"{prefix}.dora_scale"] = flat.reshape(shape)
    return rest, magnitudes


def kohya_metadata(pipe: DiffusionPipeline) -> dict[str, str]:
    """The ``ss_*`` header fields kohya's scripts write; UIs show them and some read dim/alpha."""
    config = pipe.unet.peft_config[ADAPTER]
    sdxl = is_sdxl(pipe)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.r),
        "ss_network_alpha": str(float(config.lora_alpha)),
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
        "ss_training_comment": "trained with ghibli_lab",
    }
    if config.use_dora:  # kohya's own DoRA runs record the algorithm as LyCORIS does
        metadata["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": True})
    return metadata


def load_lora(pipe: DiffusionPipeline, path: str | Path, adapter_name: str = ADAPTER) -> None:
    """Load a diffusers- or kohya-format LoRA file (or a run's ``lora/`` dir) into ``pipe``."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)


def has_adapter(pipe: DiffusionPipeline) -> bool:
    """Whether any component carries a PEFT adapter."""
    return any(getattr(c, "peft_config", None) for c in pipe.components.values() if isinstance(c, torch.nn.Module))


@contextmanager
def without_adapter(pipe: DiffusionPipeline) -> Iterator[DiffusionPipeline]:
    """The base model inside the block: every adapter disabled and every fully fine-tuned
    component swapped for its base copy; all put back after it, even on an error (a disabled
    adapter that stays disabled scores every later run as the base). Textual inversion needs
    nothing here: the base side's prompts simply lack the token."""
    swapped = {}
    for name, base in getattr(pipe, BASE_COMPONENTS, {}).items():
        trained = getattr(pipe, name)
        param = next(trained.parameters())
        swapped[name] = trained
        setattr(pipe, name, base.to(param.device))
    adapters = has_adapter(pipe)
    if adapters:
        pipe.disable_lora()
    try:
        yield pipe
    finally:
        if adapters:
            pipe.enable_lora()
        for name, trained in swapped.items():
            getattr(pipe, name).to("cpu")  # the base copy waits off the device
            setattr(pipe, name, trained)


@contextmanager
def loaded_adapter(pipe: DiffusionPipeline, path: str | Path, adapter_name: str = ADAPTER) -> Iterator[DiffusionPipeline]:
    """``pipe`` with the adapter file at ``path`` loaded inside the block, unloaded after it."""
    load_lora(pipe, path, adapter_name=adapter_name)
    try:
        yield pipe
    finally:
        pipe.unload_lora_weights()
