"""The diffusion objective: epsilon or v-prediction MSE, min-SNR-γ, noise offset; the training
loss of a batch at random timesteps and the validation loss at fixed ones.

Plain values in (no config objects), so the trainer, evaluation and the benchmark share them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.training_utils import compute_snr

from ghibli_lab.encode import batch_text, encode_text, eval_mode, latent_distribution
from ghibli_lab.runs import process_shard


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


def unet_prediction(pipe: DiffusionPipeline, noisy, timesteps, batch: dict, dtype: torch.dtype) -> torch.Tensor:
    """Run the UNet with the batch's text (and, for SDXL, size) conditioning."""
    embeds, pooled = batch_text(pipe, batch, noisy.device)
    kwargs = {}
    if pooled is not None:
        # SDXL micro-conditioning (Podell et al. 2023, sec. 2.2): original size, crop, target size.
        res = noisy.shape[-1] * pipe.vae_scale_factor
        n = noisy.shape[0]
        target = torch.full((n, 2), res, device=noisy.device, dtype=torch.long)  # no host-to-device copy
        time_ids = torch.cat([batch["original_size"].to(noisy.device), batch["crop_top_left"].to(noisy.device), target], dim=1)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
    return pipe.unet(noisy, timesteps, encoder_hidden_states=embeds.to(dtype), **kwargs).sample


def training_loss(
    pipe: DiffusionPipeline,
    batch: dict,
    noise_scheduler: DDPMScheduler,
    dtype: torch.dtype,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
    shard: tuple[int, int] = (0, 1),
    guidance: float = 1.0,
    uncond: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Per-sample loss of one batch at random timesteps: noise or v-prediction MSE, optionally
    min-SNR-γ weighted, with optional offset noise. ``shard`` = (process index, process count):
    random draws are made for the global batch and sliced (see shard_randn).

    ``guidance`` != 1: the SD 1.5 study's CFG-guided loss (experimental). The prediction trained
    is the guided one, uncond + g·(cond − uncond), as sampling with guidance g would form it, with
    ``uncond`` the empty prompt's embeddings (and pooled embeddings on SDXL); two UNet passes."""
    dist = latent_distribution(pipe, batch)
    device = pipe.unet.device
    latents = dist.mean.to(device)
    # A fresh posterior sample every step (mean + std * eps, as DiagonalGaussianDistribution.sample).
    latents = latents + dist.std.to(device) * shard_randn(latents.shape, shard, device=device, dtype=latents.dtype)
    latents = (latents * pipe.vae.config.scaling_factor).to(dtype)
    noise = sample_noise(latents, noise_offset, shard=shard)
    rank, world = shard
    b = latents.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b * world,), device=latents.device)
    timesteps = timesteps[rank * b : (rank + 1) * b]
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet_prediction(pipe, noisy, timesteps, batch, dtype)
    if guidance != 1.0:
        embeds, pooled = uncond
        empty = {**batch, "prompt_embeds": embeds.expand(b, -1, -1)}
        if pooled is not None:
            empty["pooled_prompt_embeds"] = pooled.expand(b, -1)
        pred_uncond = unet_prediction(pipe, noisy, timesteps, empty, dtype)
        pred = pred_uncond + guidance * (pred - pred_uncond)
    return diffusion_loss(pred, latents, noise, timesteps, noise_scheduler, snr_gamma)


@torch.no_grad()
def empty_prompt_embeddings(pipe: DiffusionPipeline) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The empty prompt's text conditioning (what classifier-free guidance calls unconditional),
    encoded once wherever the text encoders are (the cache may have moved them off the device)."""
    embeds, pooled = encode_text(pipe, [""])
    device = pipe.unet.device
    return embeds.to(device), (pooled.to(device) if pooled is not None else None)


def batch_mean(per_sample: torch.Tensor, batch: dict) -> torch.Tensor:
    """The loss of a batch: the mean; with DreamBooth's class rows, the instance mean plus
    ``prior_weight`` x the class mean (Ruiz et al. 2023, eq. 2). Pairs make the counts equal, so
    that is the weighted sum over the rows divided by the instance count."""
    if "loss_weight" not in batch:
        return per_sample.mean()
    weights = batch["loss_weight"].to(per_sample)
    return (per_sample * weights).sum() / (~batch["prior"]).sum().clamp(min=1)


@torch.no_grad()
def validation_loss(
    pipe: DiffusionPipeline,
    val_batches: list[dict],
    noise_scheduler: DDPMScheduler,
    timesteps: list[int],
    seed: int,
    per_sample: bool = False,
):
    """Mean unweighted loss on the held-out set at fixed ``timesteps`` with fixed noise.

    The per-step training loss is dominated by the random timestep and shows no trend; this one
    only changes when the model does (as kohya's validation loss). Its noise comes from its own
    generators, so validating never changes the training trajectory. With several processes the
    batches are split between them and the sums all-reduced.

    Returns the mean (None without held-out data); with ``per_sample`` (one process only), also
    each held-out example's mean over the timesteps, in order, for evaluation's bootstrap.
    """
    if not val_batches:
        return (None, None) if per_sample else None
    unet = pipe.unet
    rank, world = process_shard()
    total = torch.zeros(2, dtype=torch.float64, device=unet.device)  # loss sum, sample count
    samples = []
    with eval_mode(pipe):
        for index in range(rank, len(val_batches), world):  # each process takes every world-th batch
            batch = val_batches[index]
            # Noise seeded per batch, so the number is the same however the batches are sharded.
            generator = torch.Generator("cpu").manual_seed(seed * 1_000_003 + index)
            latents = batch["latents"].to(unet.device, unet.dtype)
            sample_sum = torch.zeros(latents.shape[0], dtype=torch.float64) if per_sample else None
            for t in timesteps:
                noise = torch.randn(latents.shape, generator=generator).to(latents)
                steps = torch.full((latents.shape[0],), t, device=latents.device, dtype=torch.long)
                noisy = noise_scheduler.add_noise(latents, noise, steps)
                pred = unet_prediction(pipe, noisy, steps, batch, unet.dtype)
                loss = diffusion_loss(pred, latents, noise, steps, noise_scheduler, snr_gamma=None)
                total += torch.stack([loss.sum().double(), torch.tensor(loss.numel(), dtype=torch.float64, device=loss.device)])
                if per_sample:
                    sample_sum += loss.double().cpu()
            if per_sample:
                samples.append(sample_sum / len(timesteps))
    if world > 1:
        torch.distributed.all_reduce(total)
    mean = (total[0] / total[1]).item()
    return (mean, torch.cat(samples)) if per_sample else mean
