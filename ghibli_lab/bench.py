"""Training-step benchmark of LoRA on full-size SDXL and SD 1.5:  python -m ghibli_lab.bench [key=value ...]

Builds the published SDXL base 1.0 and SD 1.5 architectures with random weights (no download),
attaches the trainer's LoRA and times the trainer's own step: ``loss.training_loss``, then
``step.optimizer_step`` (backward, gradient clipping, AdamW). Two modes run side by side (conf/bench.yaml):

- ``reference``: what the seed scripts do. fp32 weights under fp16 autocast with a GradScaler;
  every step encodes pixels with the VAE and captions with the text encoder(s).
- ``fast``: the cache's batches (VAE posterior moments and text embeddings, computed once before
  the clock starts; VAE and text encoders then leave the device), frozen weights in bf16 under bf16
  autocast (as accelerate's ``mixed_precision=bf16`` runs the trainer) with fp32 LoRA weights,
  SDPA attention, TF32 matmuls, fused AdamW on CUDA, and optionally gradient checkpointing,
  ``torch.compile`` of the UNet and channels_last.

Per row it reports images/s, ms/step, peak device memory, model FLOPs per step (counted with
``torch.utils.flop_counter.FlopCounterMode``) and MFU against the device's dense bf16 peak. It
writes ``bench.json`` and ``bench.md`` into its run dir and prints the path of ``bench.json``.
``size=tiny`` runs the same code on the tiny test models (64 px), which is how CI exercises it on
a CPU; ``size=full`` on a CPU is refused unless ``allow_cpu_full=true`` (a full SDXL step takes
minutes there and the numbers mean nothing).
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import logging
import platform
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from diffusers import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ghibli_lab.adapters import attach_lora
from ghibli_lab.config import CONF_DIR, register_configs
from ghibli_lab.encode import encode_text, offload_encoders, set_train_mode
from ghibli_lab.loss import training_loss
from ghibli_lab.pipeline import build_full_components, build_full_pipeline, build_tiny_pipeline, training_scheduler
from ghibli_lab.step import make_accelerator, optimizer_step

log = logging.getLogger(__name__)
register_configs()

MODELS = ("sdxl", "sd15")
MODES = ("reference", "fast")
SIZES = ("full", "tiny")
OOM = "out of memory"
CAPTION = "a quiet village street at dusk, in the style of a hand-painted animated film"


# ----------------------------------------------------------------------------------------------
# Config checks (the schema, BenchConfig, is in config.py with the others)


class BenchConfigError(ValueError):
    """A config the benchmark refuses before building anything."""


def check_bench_config(cfg: DictConfig, device: torch.device) -> None:
    """Range and choice checks the schema's types can't express. Raises BenchConfigError."""
    errors = []
    if cfg.size not in SIZES:
        errors.append(f"size={cfg.size!r} is not one of {', '.join(SIZES)}")
    for key, allowed in (("models", MODELS), ("modes", MODES)):
        bad = [v for v in cfg[key] if v not in allowed]
        if bad or not cfg[key]:
            errors.append(f"{key}={list(cfg[key])} must be a non-empty list of {', '.join(allowed)}")
    if not cfg.batch_sizes or any(b < 1 for b in cfg.batch_sizes):
        errors.append(f"batch_sizes={list(cfg.batch_sizes)} must be a non-empty list of integers >= 1")
    if not cfg.gradient_checkpointing:
        errors.append("gradient_checkpointing must list at least one of false, true")
    if cfg.steps < 1:
        errors.append(f"steps must be >= 1, got {cfg.steps}")
    if cfg.warmup < 0:
        errors.append(f"warmup must be >= 0, got {cfg.warmup}")
    if cfg.lora_rank < 1:
        errors.append(f"lora_rank must be >= 1, got {cfg.lora_rank}")
    for key, res in cfg.resolution.items():
        if res < 8 or res % 8:
            errors.append(f"resolution.{key} must be a positive multiple of 8, got {res}")
    if errors:
        raise BenchConfigError("invalid config:\n  " + "\n  ".join(errors))
    if cfg.size == "full" and device.type == "cpu" and not cfg.allow_cpu_full:
        raise BenchConfigError(
            "size=full needs a GPU: no CUDA device here, and one full-size SDXL training step at 1024 px "
            "takes minutes on a CPU, which measures nothing useful. Run `make bench` on a GPU box, use "
            "size=tiny (`make bench-tiny`) to exercise the code, or pass allow_cpu_full=true to run anyway."
        )
    if cfg.compile and cfg.warmup < 2:
        log.warning("compile=true with warmup=%d: compilation time will land in the timed steps", cfg.warmup)


# ----------------------------------------------------------------------------------------------
# Peak dense BF16 tensor throughput per GPU, without 2:4 structured sparsity (the datasheets'
# headline numbers are the sparse ones, twice these). Matched in order against
# torch.cuda.get_device_name(), lower-cased, so the more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float, str], ...] = (
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): BF16 1,979 TFLOPS SXM,
    # 1,513 PCIe, 1,671 NVL, all "with sparsity". GH200 has the H100 SXM tensor cores.
    ("gh200", 989e12, "NVIDIA GH200 datasheet (H100 SXM class), 1979 TFLOPS sparse / 2"),
    ("h100 nvl", 835e12, "NVIDIA H100 datasheet, NVL: 1671 TFLOPS sparse / 2"),
    ("h100 pcie", 756e12, "NVIDIA H100 datasheet, PCIe: 1513 TFLOPS sparse / 2"),
    ("h100", 989e12, "NVIDIA H100 datasheet, SXM (HBM3): 1979 TFLOPS sparse / 2"),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): 1,979 SXM, 1,671 NVL (sparse).
    ("h200 nvl", 835e12, "NVIDIA H200 datasheet, NVL: 1671 TFLOPS sparse / 2"),
    ("h200", 989e12, "NVIDIA H200 datasheet, SXM: 1979 TFLOPS sparse / 2"),
    # NVIDIA A100 datasheet: BF16 312 TFLOPS dense (624 sparse), SXM and PCIe, 40 and 80 GB.
    ("a100", 312e12, "NVIDIA A100 datasheet: 312 TFLOPS dense"),
    # NVIDIA L40S datasheet: BF16 733 TFLOPS with sparsity -> 362 dense.
    ("l40s", 362e12, "NVIDIA L40S datasheet: 733 TFLOPS sparse / 2"),
    # NVIDIA Ada Lovelace architecture whitepaper, appendix: RTX 4090 peak BF16 tensor TFLOPS with
    # FP32 accumulate 165.2 dense (330.4 sparse), which is what PyTorch's bf16 matmuls use.
    ("rtx 4090", 165e12, "NVIDIA Ada whitepaper: 165.2 TFLOPS dense (FP32 accumulate)"),
)


def peak_bf16_flops(device_name: str) -> tuple[float | None, str]:
    """(peak dense bf16 FLOP/s, source) for a CUDA device name; (None, reason) when unknown."""
    name = device_name.lower()
    for key, peak, source in PEAK_BF16_FLOPS:
        if key in name:
            return peak, source
    return None, f"no dense-bf16 peak known for {device_name!r}: MFU not computed"


# ----------------------------------------------------------------------------------------------
# FLOP counting.

# On CPU, SDPA dispatches to a kernel FlopCounterMode has no formula for (CUDA's flash, efficient
# and cuDNN kernels are covered); count it with the same formulas so CPU and GPU counts agree.
CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v)
    ),
}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (matmuls, convolutions, attention; 2 per multiply-add) of everything ``fn`` runs."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------
# One (model, mode): its pipeline, LoRA, batch and step.


@dataclass
class Setup:
    """Everything one (model, mode) needs to time steps."""

    model: str
    mode: str
    pipe: DiffusionPipeline
    params: list[torch.nn.Parameter]
    batch: dict  # for the largest batch size; rows slice it
    noise_scheduler: Any
    device: torch.device
    dtype: torch.dtype  # the frozen weights' dtype (training_loss's ``dtype``)
    autocast_dtype: torch.dtype | None  # None: no autocast
    loss_cfg: DictConfig
    compiled: bool = False


def build_setup(cfg: DictConfig, model: str, mode: str, device: torch.device) -> Setup:
    """Pipeline (full or tiny) on ``device``, LoRA attached as the trainer does, and the batch:
    pixels + captions for ``reference``; the cache's latent moments + embeddings for ``fast``,
    encoded here, before any clock starts, after which the encoders leave the device."""
    fast = mode == "fast"
    dtype = torch.bfloat16 if fast else torch.float32
    torch.manual_seed(0)
    if cfg.size == "tiny":
        pipe = build_tiny_pipeline(model).to(device)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        pipe = build_full_pipeline(model, device, dtype)
    # The trainer's default adapter (conf/lora/r8a8.yaml: attention targets) at rank = alpha = lora_rank.
    lora_cfg = OmegaConf.merge(OmegaConf.load(Path(CONF_DIR) / "lora" / "r8a8.yaml"), {"rank": cfg.lora_rank, "alpha": float(cfg.lora_rank)})
    params = attach_lora(pipe, lora_cfg)
    set_train_mode(pipe, True)
    # LoRA weights stay fp32 under bf16 frozen weights (diffusers' LoRA scripts do the same).
    cast_training_params([pipe.unet], dtype=torch.float32)
    if fast and cfg.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)

    resolution = cfg.resolution.tiny if cfg.size == "tiny" else cfg.resolution[model]
    batch = make_batch(pipe, model, max(cfg.batch_sizes), resolution, device, cached=fast)
    if fast:
        offload_encoders(pipe, text=True)  # as train.py does once the cache is complete
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # The trainer's defaults (conf/train.yaml): min-SNR-gamma 5, no offset noise, AdamW settings.
    loss_cfg = OmegaConf.create({"train": OmegaConf.load(Path(CONF_DIR) / "train.yaml").train})
    autocast_dtype = torch.bfloat16 if fast else torch.float16
    if device.type == "cpu" and autocast_dtype == torch.float16:
        autocast_dtype = None  # CPU fp16 kernels are ~10x slower than fp32; train.py runs fp32 there too
    return Setup(
        model=model,
        mode=mode,
        pipe=pipe,
        params=params,
        batch=batch,
        noise_scheduler=training_scheduler(pipe),
        device=device,
        dtype=dtype,
        autocast_dtype=autocast_dtype,
        loss_cfg=loss_cfg,
    )


def make_batch(pipe, model: str, batch_size: int, resolution: int, device: torch.device, cached: bool) -> dict:
    """A batch in the trainer's format, on ``device``: random images in [-1, 1] and captions, or,
    when ``cached``, what the cache stores for them (fp32 posterior moments and text embeddings,
    computed per image as cache.encode_records does)."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch_size, 3, resolution, resolution, generator=generator) * 2 - 1
    captions = [f"{CAPTION}, {i}" for i in range(batch_size)]
    batch: dict[str, Any] = {"caption": captions}
    if model == "sdxl":
        batch["original_size"] = torch.full((batch_size, 2), resolution, dtype=torch.long, device=device)
        batch["crop_top_left"] = torch.zeros(batch_size, 2, dtype=torch.long, device=device)
    if not cached:
        batch["pixel_values"] = pixels.to(device)
        return batch
    with torch.no_grad():
        moments = [pipe.vae.encode(p[None].to(device, pipe.vae.dtype)).latent_dist.parameters for p in pixels]
        embeds, pooled = encode_text(pipe, captions)
    batch["latent_moments"] = torch.cat(moments).float()
    batch["prompt_embeds"] = embeds.float()
    if pooled is not None:
        batch["pooled_prompt_embeds"] = pooled.float()
    return batch


def slice_batch(batch: dict, batch_size: int) -> dict:
    return {k: v[:batch_size] for k, v in batch.items()}


def make_optimizer(setup: Setup) -> torch.optim.Optimizer:
    """AdamW with the trainer's defaults; fused (one kernel for all LoRA tensors) in fast mode on CUDA."""
    t = setup.loss_cfg.train
    return torch.optim.AdamW(
        setup.params,
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
        weight_decay=t.weight_decay,
        fused=setup.mode == "fast" and setup.device.type == "cuda",
    )


def step_loss(setup: Setup, batch: dict) -> torch.Tensor:
    """The trainer's loss of one batch, under the mode's autocast."""
    dtype = setup.autocast_dtype
    with torch.autocast(setup.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        t = setup.loss_cfg.train
        return training_loss(setup.pipe, batch, setup.noise_scheduler, setup.dtype, t.noise_offset, t.snr_gamma).mean()


def train_step(setup: Setup, batch: dict, optimizer, accelerator) -> torch.Tensor:
    """Loss, then the trainer's own ``optimizer_step`` (backward, clip, AdamW). Nothing here waits on
    the device beyond what ``training_loss`` does (``host_syncs_per_step`` counts it), except the
    reference's fp16 grad scaler, which checks for infs on the host as in the scripts it stands for."""
    loss = step_loss(setup, batch)
    optimizer_step(loss, setup.params, optimizer, accelerator, setup.loss_cfg.train.max_grad_norm)
    return loss.detach()


def step_flops(setup: Setup, batch_size: int) -> int:
    """Model FLOPs of one step (forward + backward) at ``batch_size``, counted in eager mode with
    gradient checkpointing off: MFU counts the model's FLOPs, not recomputation (PaLM, Chowdhery
    et al. 2022, appendix B). The optimizer's elementwise work isn't counted."""
    unet = setup.pipe.unet
    checkpointing = unet.is_gradient_checkpointing
    if checkpointing:
        unet.disable_gradient_checkpointing()
    batch = slice_batch(setup.batch, batch_size)
    try:
        flops = count_flops(lambda: step_loss(setup, batch).backward())
    finally:
        for p in setup.params:
            p.grad = None
        if checkpointing:
            unet.enable_gradient_checkpointing()
    return flops


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(setup: Setup, batch_size: int, checkpointing: bool, cfg: DictConfig) -> dict:
    """Warm up, then time ``cfg.steps`` steps; synchronizes only around the timed region."""
    device, unet = setup.device, setup.pipe.unet
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    if setup.compiled:
        torch._dynamo.reset()  # a fresh static-shape graph per row (a 2nd batch size would go dynamic)
    batch = slice_batch(setup.batch, batch_size)
    # A fresh accelerator per row: fp16 with its grad scaler for the reference on a GPU, as the
    # seed scripts run; the optimizer prepared by it, as the trainer's is.
    reference_fp16 = setup.mode == "reference" and device.type == "cuda"
    accelerator, _ = make_accelerator("fp16" if reference_fp16 else "no")
    optimizer = accelerator.prepare(make_optimizer(setup))
    torch.manual_seed(0)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    syncs = None
    for i in range(cfg.warmup):
        if device.type == "cuda" and i == cfg.warmup - 1:
            syncs = count_host_syncs(lambda: train_step(setup, batch, optimizer, accelerator))
        else:
            train_step(setup, batch, optimizer, accelerator)
    synchronize(device)
    start = time.perf_counter()
    losses = [train_step(setup, batch, optimizer, accelerator) for _ in range(cfg.steps)]
    synchronize(device)
    elapsed = time.perf_counter() - start

    loss = torch.stack(losses).float().mean().item()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del optimizer, accelerator, losses
    return {
        "images_per_s": batch_size * cfg.steps / elapsed,
        "step_ms": 1000 * elapsed / cfg.steps,
        "peak_mem_gib": peak,
        "loss": loss,
        "host_syncs_per_step": syncs,
    }


def count_host_syncs(fn: Callable[[], Any]) -> int:
    """Host-device synchronizations inside ``fn`` (CUDA), from torch's sync debug mode."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------------------------
# The run.


def row_plan(cfg: DictConfig, mode: str) -> list[tuple[int, bool]]:
    """(batch size, gradient checkpointing) per row of one mode: reference rows never checkpoint
    (the seed scripts don't); fast rows take every value of ``gradient_checkpointing``."""
    checkpointing = list(dict.fromkeys(bool(c) for c in cfg.gradient_checkpointing)) if mode == "fast" else [False]
    return [(bs, ckpt) for bs in cfg.batch_sizes for ckpt in checkpointing]


def bench(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run every (model, mode, batch size, checkpointing) row of ``cfg``; write ``bench.json`` and
    ``bench.md`` into ``out_dir`` and return what bench.json holds. A row that runs out of device
    memory records ``"error": "out of memory"`` and the run goes on; so does any other failure,
    with its message (main() then exits non-zero)."""
    out_dir = Path(out_dir)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    check_bench_config(cfg, device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()})"
    peak, peak_note = peak_bf16_flops(device_name) if device.type == "cuda" else (None, "CPU: MFU not computed")
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    rows: list[dict] = []
    notes = [
        "images/s = batch size x timed steps / wall time of the timed steps (device synchronized before and after)",
        "flops_per_step: model FLOPs of forward + backward (FlopCounterMode, eager, no checkpointing recomputation), "
        "counted at batch 1 and scaled by the batch size; MFU = flops_per_step x steps/s / peak",
        "speedup: fastest successful fast row / reference row, images/s, per model and batch size",
    ]
    if device.type == "cpu":
        notes.append(
            "CPU: no peak memory or MFU; the reference runs in fp32 (CPU fp16 autocast is ~10x slower) and bf16 "
            "is slow on most CPUs, so CPU timings and speedups say nothing about a GPU"
        )
    try:
        for model in cfg.models:
            for mode in cfg.modes:
                rows += bench_model_mode(cfg, model, mode, device, peak, notes)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    result = {
        "device": device_name,
        "versions": versions(),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "size": cfg.size,
        "peak_bf16_flops": peak,
        "peak_source": peak_note,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "rows": rows,
        "speedup": speedups(rows),
        "notes": notes,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    (out_dir / "bench.md").write_text(render_markdown(result))
    return result


def bench_model_mode(
    cfg: DictConfig, model: str, mode: str, device: torch.device, peak: float | None, notes: list[str]
) -> list[dict]:
    """The rows of one (model, mode), on a pipeline built for it and freed afterwards; failures
    that aren't one row's go to ``notes``."""
    fast = mode == "fast"
    plan = row_plan(cfg, mode)
    rows = [
        {
            "model": model,
            "mode": mode,
            "batch_size": bs,
            "gradient_checkpointing": ckpt,
            "compile": bool(fast and cfg.compile),
            "channels_last": bool(fast and cfg.channels_last),
            "precision": precision(mode, device),
            "images_per_s": None,
            "step_ms": None,
            "peak_mem_gib": None,
            "flops_per_step": None,
            "mfu": None,
            "loss": None,
            "host_syncs_per_step": None,
            "error": None,
        }
        for bs, ckpt in plan
    ]
    # TF32 for fp32 matmuls and convolutions in fast mode; PyTorch's defaults (matmul off, cuDNN
    # on) for the reference, as the scripts it stands for leave them.
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = True
    setup = None
    try:
        log.info("%s %s: building the %s pipeline", model, mode, cfg.size)
        setup = build_setup(cfg, model, mode, device)
    except Exception as err:  # noqa: BLE001 - recorded per row, the run goes on
        message = describe(err)
        for row in rows:
            row["error"] = message
        del setup
        free(device)
        return rows

    # Counted once at batch 1, before any compilation, and scaled: every op of the step is
    # per-sample, so the count is linear in the batch (tests/test_bench.py checks it).
    try:
        flops_1 = step_flops(setup, 1)
    except Exception as err:  # noqa: BLE001 - e.g. no room without checkpointing: no FLOPs, rows go on
        flops_1 = None
        notes.append(f"{model} {mode}: FLOP count failed ({describe(err)}), so no FLOPs or MFU")
    free(device)
    if fast and cfg.compile:
        setup.pipe.unet.compile()  # in place, as train.py does
        setup.compiled = True

    for row in rows:
        bs, ckpt = row["batch_size"], row["gradient_checkpointing"]
        try:
            row.update(measure(setup, bs, ckpt, cfg))
        except Exception as err:  # noqa: BLE001
            row["error"] = describe(err)
        for p in setup.params:
            p.grad = None
        free(device)
        if row["error"] is None and flops_1 is not None:
            row["flops_per_step"] = flops_1 * bs
            if peak is not None:
                row["mfu"] = row["flops_per_step"] * row["images_per_s"] / bs / peak
        log.info("%s", format_row(row))
    compiled = setup.compiled
    del setup
    if compiled:
        torch._dynamo.reset()  # drop the compiled graphs (and the weights they hold)
    free(device)
    return rows


def describe(err: BaseException) -> str:
    """A row's error: "out of memory" for any allocation failure (cuBLAS and cuDNN report theirs as
    plain RuntimeErrors), else the exception's type and message, with the traceback logged."""
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        return OOM
    log.error("%s", "".join(traceback.format_exception(err)))
    return f"{type(err).__name__}: {err}"


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def speedups(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """Per model and batch size: the fastest successful fast row's images/s over the reference
    row's; None where either is missing or failed."""
    best: dict[tuple, float] = {}
    out: dict[str, dict[str, float | None]] = {}
    for r in rows:
        out.setdefault(r["model"], {})[str(r["batch_size"])] = None
        if r["error"] is None and r["images_per_s"] is not None:
            key = (r["model"], r["mode"], r["batch_size"])
            best[key] = max(best.get(key, 0.0), r["images_per_s"])
    for model, per_bs in out.items():
        for bs in per_bs:
            ref, fast = best.get((model, "reference", int(bs))), best.get((model, "fast", int(bs)))
            per_bs[bs] = fast / ref if ref and fast else None
    return out


def precision(mode: str, device: torch.device) -> str:
    if mode == "fast":
        return "bf16 frozen weights, fp32 LoRA, bf16 autocast"
    if device.type == "cpu":
        return "fp32 weights, no autocast (CPU fp16 is slow), GradScaler"
    return "fp32 weights, fp16 autocast, GradScaler"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for package in ("torch", "diffusers", "transformers", "peft", "accelerate", "hydra-core"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    out["cuda"] = torch.version.cuda
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    return out


# ----------------------------------------------------------------------------------------------
# Output.


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_row(row: dict) -> str:
    head = f"{row['model']} {row['mode']} bs={row['batch_size']} ckpt={row['gradient_checkpointing']}"
    if row["error"]:
        return f"{head}: {row['error']}"
    mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    mem = "-" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.2f} GiB"
    return f"{head}: {row['images_per_s']:.3f} img/s, {row['step_ms']:.1f} ms/step, peak {mem}, MFU {mfu}"


def render_markdown(result: dict) -> str:
    """bench.md: the device, versions and date; one table row per config; the speedups."""
    v = result["versions"]
    lines = [
        f"# LoRA training-step benchmark ({result['size']} models)",
        "",
        f"- device: {result['device']}",
        f"- date: {result['date']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- MFU peak: {_num(result['peak_bf16_flops'] and result['peak_bf16_flops'] / 1e12, '.0f')} TFLOP/s dense bf16"
        f" ({result['peak_source']})",
        f"- {result['config']['warmup']} warmup + {result['config']['steps']} timed steps per row; LoRA rank "
        f"{result['config']['lora_rank']}; FLOPs are model FLOPs (no recomputation), forward + backward",
        "",
        "| model | mode | batch | grad ckpt | compile | images/s | ms/step | peak GiB | TFLOP/step | MFU | error |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        flops = None if r["flops_per_step"] is None else r["flops_per_step"] / 1e12
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['batch_size']} | {'yes' if r['gradient_checkpointing'] else 'no'} "
            f"| {'yes' if r['compile'] else 'no'} | {_num(r['images_per_s'], '.3f')} | {_num(r['step_ms'], '.1f')} "
            f"| {_num(r['peak_mem_gib'], '.2f')} | {_num(flops, '.4g')} "
            f"| {_num(mfu, '.1f')}{'%' if mfu is not None else ''} "
            f"| {r['error'] or ''} |"
        )
    lines += ["", "## Speedup (fastest fast row / reference, images/s)", ""]
    lines += ["| model | batch | speedup |", "|---|---:|---:|"]
    for model, per_bs in result["speedup"].items():
        for bs, ratio in per_bs.items():
            lines.append(f"| {model} | {bs} | {_num(ratio, '.2f')}{'x' if ratio is not None else ''} |")
    lines += ["", "## Notes", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


@hydra.main(config_path=CONF_DIR, config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = bench(cfg, out_dir)
    except BenchConfigError as err:
        raise SystemExit(f"ghibli_lab.bench: {err}") from None
    print(out_dir / "bench.json")
    failed = [r for r in result["rows"] if r["error"] not in (None, OOM)]
    if failed:
        raise SystemExit(f"ghibli_lab.bench: {len(failed)} row(s) failed; see bench.md and the log")


if __name__ == "__main__":
    main()
