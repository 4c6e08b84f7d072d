"""The training objective in ghibli_lab.loss, against the formulas and diffusers' own helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from ghibli_lab.loss import diffusion_loss, min_snr_weights, sample_noise


def sd_scheduler(prediction_type="epsilon"):
    """The SD 1.5 / SDXL training noise schedule."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )


def batch(seed=0, shape=(4, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    model_pred = torch.randn(shape, generator=g)
    timesteps = torch.tensor([0, 250, 600, 999])[: shape[0]]
    return model_pred, latents, noise, timesteps


def test_min_snr_weights_match_the_formulas_by_hand():
    """eps: min(snr, γ)/snr; v: min(snr, γ)/(snr+1), below, at and above γ."""
    snr = torch.tensor([0.5, 1.0, 5.0, 10.0, 100.0])
    eps = min_snr_weights(snr, 5.0, "epsilon")
    v = min_snr_weights(snr, 5.0, "v_prediction")
    torch.testing.assert_close(eps, torch.tensor([1.0, 1.0, 1.0, 0.5, 0.05]))
    torch.testing.assert_close(v, torch.tensor([0.5 / 1.5, 0.5, 5.0 / 6.0, 5.0 / 11.0, 5.0 / 101.0]))
    assert eps.shape == snr.shape


def test_min_snr_weights_with_large_gamma_leave_epsilon_loss_unweighted():
    """With γ above every SNR the epsilon weights are all 1 (plain MSE)."""
    snr = torch.tensor([0.01, 0.3, 2.0, 7.0])
    torch.testing.assert_close(min_snr_weights(snr, 1e6, "epsilon"), torch.ones(4))
    torch.testing.assert_close(min_snr_weights(snr, 1e6, "v_prediction"), snr / (snr + 1))


def test_min_snr_weights_reject_unknown_prediction_type():
    """A prediction type min-SNR is not defined for is an error, not a silent weighting."""
    with pytest.raises(ValueError, match="sample"):
        min_snr_weights(torch.tensor([1.0]), 5.0, "sample")


def test_epsilon_loss_is_per_sample_mse_against_the_noise():
    """epsilon models: loss[i] = mean((pred_i - noise_i)^2); shape [B]."""
    model_pred, latents, noise, timesteps = batch()
    loss = diffusion_loss(model_pred, latents, noise, timesteps, sd_scheduler("epsilon"))
    expected = ((model_pred - noise) ** 2).mean(dim=(1, 2, 3))
    assert loss.shape == (4,)
    torch.testing.assert_close(loss, expected)


def test_v_prediction_loss_targets_the_velocity():
    """v models: the target is scheduler.get_velocity(latents, noise, t), not the noise."""
    model_pred, latents, noise, timesteps = batch(1)
    scheduler = sd_scheduler("v_prediction")
    loss = diffusion_loss(model_pred, latents, noise, timesteps, scheduler)
    velocity = scheduler.get_velocity(latents, noise, timesteps)
    torch.testing.assert_close(loss, F.mse_loss(model_pred, velocity, reduction="none").mean(dim=(1, 2, 3)))
    # A perfect velocity prediction has zero loss; predicting the noise does not.
    assert torch.all(diffusion_loss(velocity, latents, noise, timesteps, scheduler) == 0)
    assert torch.all(diffusion_loss(noise, latents, noise, timesteps, scheduler) > 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_snr_gamma_weights_the_loss_with_diffusers_snr(prediction_type):
    """snr_gamma multiplies each sample's loss by min-SNR weights from diffusers' compute_snr."""
    model_pred, latents, noise, timesteps = batch(2)
    scheduler = sd_scheduler(prediction_type)
    plain = diffusion_loss(model_pred, latents, noise, timesteps, scheduler)
    weighted = diffusion_loss(model_pred, latents, noise, timesteps, scheduler, snr_gamma=5.0)
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, 5.0))
    weights = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    torch.testing.assert_close(weighted, plain * weights)
    # t=0 has a huge SNR, so it is down-weighted; t=999 has SNR < 5, so eps leaves it as is.
    assert weighted[0] < plain[0]
    if prediction_type == "epsilon":
        torch.testing.assert_close(weighted[-1], plain[-1])


def test_loss_rejects_unsupported_prediction_type():
    model_pred, latents, noise, timesteps = batch()
    with pytest.raises(ValueError, match="sample"):
        diffusion_loss(model_pred, latents, noise, timesteps, sd_scheduler("sample"))


def test_loss_is_float32_for_half_precision_predictions():
    """bf16 predictions (mixed precision) still give a float32 loss equal to the float32 one."""
    model_pred, latents, noise, timesteps = batch(3)
    scheduler = sd_scheduler()
    loss = diffusion_loss(model_pred.bfloat16(), latents, noise, timesteps, scheduler)
    assert loss.dtype == torch.float32
    ref = diffusion_loss(model_pred.bfloat16().float(), latents, noise, timesteps, scheduler)
    torch.testing.assert_close(loss, ref)


def test_sample_noise_without_offset_is_plain_randn():
    """noise_offset=0: exactly torch.randn from the same generator state."""
    latents = torch.zeros(2, 4, 8, 8)
    noise = sample_noise(latents, 0.0, torch.Generator().manual_seed(7))
    expected = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(noise, expected)
    assert noise.dtype == latents.dtype and noise.shape == latents.shape


def test_sample_noise_offset_shifts_each_channel_by_a_constant():
    """noise_offset>0 adds one constant per (sample, channel), scaled by the offset."""
    latents = torch.zeros(3, 4, 16, 16)
    plain = sample_noise(latents, 0.0, torch.Generator().manual_seed(7))
    shifted = sample_noise(latents, 0.1, torch.Generator().manual_seed(7))
    diff = shifted - plain
    per_channel = diff[:, :, :1, :1]
    torch.testing.assert_close(diff, per_channel.expand_as(diff))  # constant over H, W
    assert per_channel.abs().min() > 0
    assert per_channel.abs().max() < 0.1 * 6  # offset * a standard normal
    assert len(torch.unique(per_channel)) == 3 * 4  # differs across samples and channels
    # Doubling the offset doubles the shift.
    doubled = sample_noise(latents, 0.2, torch.Generator().manual_seed(7)) - plain
    torch.testing.assert_close(doubled, 2 * diff)
