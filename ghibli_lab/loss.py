"""The diffusion training objective: epsilon or v-prediction MSE, min-SNR-γ, noise offset."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-γ (Hang et al. 2023, arXiv:2303.09556, eq. 10-11).

    The paper weights the x0 loss by min(SNR, γ). Written as an epsilon loss this becomes
    min(SNR, γ) / SNR; written as a v loss, min(SNR, γ) / (SNR + 1).
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"min-SNR weighting is defined for epsilon and v_prediction, not {prediction_type!r}")


def shard_randn(shape, shard: tuple[int, int] = (0, 1), **kwargs) -> torch.Tensor:
    """``torch.randn(shape)`` for this process's slice of the global batch.

    Every process draws the whole global batch's numbers from the same seeded RNG and keeps its
    rows, so N processes see exactly the noise one process would for the same global batch, and
    the RNG stays in step everywhere. With one process this is plain ``torch.randn``.
    """
    rank, world = shard
    full = torch.randn((shape[0] * world, *shape[1:]), **kwargs)
    return full[rank * shape[0] : (rank + 1) * shape[0]]


def sample_noise(
    latents: torch.Tensor,
    noise_offset: float,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] = (0, 1),
):
    """Gaussian noise, plus a per-channel constant when ``noise_offset`` > 0.

    The offset lets the model change an image's mean brightness, which plain noise can't teach
    (Guttenberg, "Diffusion with Offset Noise", crosslabs.org 2023).
    """
    kwargs = dict(generator=generator, device=latents.device, dtype=latents.dtype)
    noise = shard_randn(latents.shape, shard, **kwargs)
    if noise_offset > 0:
        b, c = latents.shape[:2]
        noise = noise + noise_offset * shard_randn((b, c, 1, 1), shard, **kwargs)
    return noise


def diffusion_loss(
    model_pred: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Per-sample MSE between the prediction and the target of the model's prediction type,
    optionally min-SNR-γ weighted. Returns shape [B]; callers take the mean."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        loss = loss * min_snr_weights(compute_snr(scheduler, timesteps), snr_gamma, prediction_type)
    return loss
