"""Text and latent encoding, where the encoders sit, and which components are in train mode.

Shared by training, the cache, validation, evaluation and the benchmark, so they all encode the
same way.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers import DiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch.utils.data import DataLoader

from ghibli_lab.adapters import adapted_models
from ghibli_lab.data import collate
from ghibli_lab.pipeline import is_sdxl


def encode_text(pipe: DiffusionPipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings as the SD/SDXL pipelines compute them, but differentiable, so a
    text-encoder LoRA can train. SDXL: penultimate hidden states of both encoders, concatenated,
    plus the second encoder's pooled projection. SD 1.5: the last hidden state."""
    sdxl = is_sdxl(pipe)
    pairs = [(pipe.tokenizer, pipe.text_encoder)] + ([(pipe.tokenizer_2, pipe.text_encoder_2)] if sdxl else [])
    embeds, pooled = [], None
    for tokenizer, encoder in pairs:
        # Textual inversion's multi-vector tokens spelled out (<tok> -> "<tok> <tok>_1 ..."), as
        # the pipelines do before encoding: training and sampling see the same ids.
        captions = pipe.maybe_convert_prompt(captions, tokenizer)
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=sdxl)
        embeds.append(out.hidden_states[-2] if sdxl else out[0])
        pooled = out[0]  # for SDXL's second encoder this is the pooled text projection
    return torch.cat(embeds, dim=-1), (pooled if sdxl else None)


def batch_text(pipe: DiffusionPipeline, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch's text conditioning: its cached embeddings, else its captions through the encoder(s)."""
    if "prompt_embeds" in batch:
        pooled = batch.get("pooled_prompt_embeds")
        return batch["prompt_embeds"].to(device), (pooled.to(device) if pooled is not None else None)
    # Frozen text encoders run without autograd (set_train_mode keeps them in eval mode); on SDXL a
    # graph through both frozen encoders makes the second backward fail (stack-facts).
    with torch.set_grad_enabled(pipe.text_encoder.training and torch.is_grad_enabled()):
        return encode_text(pipe, batch["caption"])


def latent_distribution(pipe: DiffusionPipeline, batch: dict) -> DiagonalGaussianDistribution:
    """The VAE posterior of a batch: from cached moments, or by encoding its pixels."""
    if "latent_moments" in batch:
        return DiagonalGaussianDistribution(batch["latent_moments"].to(pipe.unet.device))
    with torch.no_grad():
        return pipe.vae.encode(batch["pixel_values"].to(pipe.vae.device, pipe.vae.dtype)).latent_dist


def encode_validation_set(pipe: DiffusionPipeline, dataset, batch_size: int) -> list[dict]:
    """Held-out examples (center crop, no flip; pixels or cache entries) as fixed latents (the
    posterior mean, scaled), encoded once per run."""
    batches = []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        mean = latent_distribution(pipe, batch).mean.to(pipe.unet.device)
        batch["latents"] = mean * pipe.vae.config.scaling_factor
        batch.pop("pixel_values", None)
        batch.pop("latent_moments", None)
        batches.append(batch)
    return batches


def offload_encoders(pipe: DiffusionPipeline, text: bool) -> None:
    """Move the VAE (and the frozen text encoders when their outputs are cached) off the device."""
    for name in ("vae", *(("text_encoder", "text_encoder_2") if text else ())):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to("cpu")


def _modules(pipe: DiffusionPipeline) -> list[torch.nn.Module]:
    return [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]


@contextmanager
def encoders_on(pipe: DiffusionPipeline, device: torch.device) -> Iterator[None]:
    """Every component on ``device`` inside the block (for sampling); previous devices restored."""
    modules = _modules(pipe)
    devices = [next(m.parameters()).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, d in zip(modules, devices):
            m.to(d)


def set_train_mode(pipe: DiffusionPipeline, training: bool) -> None:
    """Frozen components always in eval mode; the adapted ones in train mode only while training."""
    adapted = adapted_models(pipe).values()
    for component in _modules(pipe):
        component.train(training and any(component is m for m in adapted))


@contextmanager
def eval_mode(pipe: DiffusionPipeline) -> Iterator[None]:
    """Every component in eval mode (LoRA dropout off) inside the block; modes restored after."""
    modules = _modules(pipe)
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
