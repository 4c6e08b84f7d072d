"""The pieces of a training step: accelerator, model preparation, loader, optimizer and schedule,
gradient averaging across processes, and ``optimizer_step``, which the trainer and the benchmark
both call, so the benchmark times the trainer's own step.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from ghibli_lab.adapters import adapted_models
from ghibli_lab.data import collate
from ghibli_lab.encode import set_train_mode
from ghibli_lab.pipeline import weight_dtype


def make_accelerator(mixed_precision: str, grad_accum: int = 1, seed: int | None = None) -> tuple[Accelerator, torch.dtype]:
    """A fresh Accelerator and the frozen weights' dtype. Hydra runs multirun jobs in one process,
    and accelerate's state is a per-process singleton: it is reset first."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)  # peak_memory_mb: this run's, not the sweep's
    if seed is not None:
        set_seed(seed)
    return accelerator, weight_dtype(mixed_precision, accelerator.device)


def prepare_for_training(pipe: DiffusionPipeline, train_cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Frozen UNet and text encoders in ``dtype`` on ``device``; adapter weights stay fp32, so the
    optimizer never sees fp16 gradients ("Attempting to unscale FP16 gradients"); the VAE stays
    fp32 (see below); speed and memory switches."""
    models = adapted_models(pipe)
    pipe.to(device)
    if dtype != torch.float32:
        # Not the VAE: latents encoded in bf16 differ from fp32 ones by ~1% (measured on the tiny
        # VAE), and the stock SDXL VAE overflows in fp16 (NaNs, black images). The diffusers
        # reference scripts keep it in fp32 too; with the latent cache, encoding is a one-time cost.
        for name in ("unet", "text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(dtype=dtype)
    set_train_mode(pipe, True)
    cast_training_params(list(models.values()), dtype=torch.float32)
    if device.type == "cuda":
        # TF32 tensor cores for the fp32 matmuls (LoRA weights, optimizer); bf16 ones are unaffected.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if train_cfg.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if train_cfg.compile:
        pipe.unet.compile()  # in place: the pipeline (sampling, saving) keeps the same module
    if train_cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        for name, model in models.items():
            if name != "unet":
                model.gradient_checkpointing_enable()


def make_loader(dataset: Dataset, train_cfg: DictConfig, generator: torch.Generator) -> DataLoader:
    """Shuffled batches whose order depends only on ``generator`` (reseeded per epoch by the loop)."""
    return DataLoader(
        dataset,
        batch_size=train_cfg.batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=train_cfg.num_workers,
        drop_last=len(dataset) >= train_cfg.batch_size,
        generator=generator,
    )


def total_steps(train_cfg: DictConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps in the run, optimizer steps per epoch)."""
    per_epoch = math.ceil(batches_per_epoch / train_cfg.grad_accum)
    return train_cfg.max_steps or train_cfg.epochs * per_epoch, per_epoch


def make_optimizer(params: list[torch.nn.Parameter], train_cfg: DictConfig, device: torch.device, max_steps: int, lr: float):
    """AdamW (``train.optimizer``) over ``params`` at ``lr``, and its learning-rate schedule."""
    kwargs = dict(lr=lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2), eps=train_cfg.adam_eps, weight_decay=train_cfg.weight_decay)
    if train_cfg.optimizer == "adamw8bit":
        optimizer = adamw_8bit(params, device, kwargs)
    else:  # fused: one kernel for all trainable tensors instead of one per tensor
        optimizer = torch.optim.AdamW(params, fused=device.type == "cuda", **kwargs)
    lr_scheduler = get_scheduler(
        train_cfg.lr_scheduler, optimizer, num_warmup_steps=train_cfg.warmup_steps, num_training_steps=max_steps
    )
    return optimizer, lr_scheduler


def adamw_8bit(params: list[torch.nn.Parameter], device: torch.device, kwargs: dict) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW (Dettmers et al. 2022, arXiv:2110.02861): Adam's two moments in
    8 bits, 6 bytes per parameter less; what lets a full fine-tune fit a 24 GB GPU."""
    try:
        import bitsandbytes
    except ImportError:
        raise ValueError("train.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes (CUDA GPUs)") from None
    if device.type != "cuda":
        raise ValueError(f"train.optimizer=adamw8bit runs on CUDA GPUs only, not {device.type}: use train.optimizer=adamw")
    return bitsandbytes.optim.AdamW8bit(params, **kwargs)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """The run's peak memory: CUDA's allocator peak since ``make_accelerator`` on a GPU; on the CPU
    the process's peak resident set (in a multirun, the max over this and the earlier jobs)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1), "cuda max allocated"
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "process peak RSS"


def average_gradients(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Mean of the adapter gradients over all processes, in one all-reduce (a no-op with one).

    The models are not DDP-wrapped: the forward runs under accelerate's autocast and these small
    gradients are averaged explicitly."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def optimizer_step(
    loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer, accelerator: Accelerator, max_grad_norm: float
) -> None:
    """Backward; at the end of an accumulation window average across processes and clip; step.
    Nothing here waits on the device except what accelerate's grad scaler does under fp16."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        average_gradients(params, accelerator)
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
