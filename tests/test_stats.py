"""Paired bootstrap intervals (ghibli_lab.stats): they reproduce the point estimators, and in a
simulation with known distributions they cover the true KID difference at the stated rate."""

from __future__ import annotations

import pytest
import torch

from ghibli_lab.metrics import features_fid, kid_unbiased
from ghibli_lab.stats import (
    bootstrap_weights,
    percentile_interval,
    polynomial_kernel,
    weighted_fid,
    weighted_mmd2,
)

D = 8  # feature dimension of the simulation


def test_bootstrap_weights_are_counts_of_n_draws():
    w = bootstrap_weights(10, 500, seed=0)
    assert w.shape == (500, 10) and torch.all(w.sum(1) == 10) and torch.all(w == w.round())
    assert torch.equal(w, bootstrap_weights(10, 500, seed=0))


def test_unit_weights_reproduce_kid_and_fid():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, D, generator=g, dtype=torch.float64)
    y = torch.randn(25, D, generator=g, dtype=torch.float64) + 0.4
    ones_x, ones_y = torch.ones(1, 30, dtype=torch.float64), torch.ones(1, 25, dtype=torch.float64)
    k = polynomial_kernel
    mmd = weighted_mmd2(k(x, x), k(y, y), k(x, y), ones_x, ones_y)
    assert float(mmd) == pytest.approx(_full_mmd(x, y), rel=1e-10)
    assert float(weighted_fid(x, y, ones_x, ones_y)) == pytest.approx(features_fid(x, y), rel=1e-8)


def _full_mmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased MMD² on the full sets, as KID computes it when its subset is the whole set."""
    if len(x) == len(y):
        return kid_unbiased(x, y, subset_size=len(x), subsets=1)
    k = polynomial_kernel
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    return float((kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.mean())


def test_integer_weights_are_the_fid_of_the_duplicated_set():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, D, generator=g, dtype=torch.float64), torch.randn(12, D, generator=g, dtype=torch.float64)
    w = bootstrap_weights(12, 3, seed=2)
    for row in w:
        dup_x = x.repeat_interleave(row.long(), dim=0)
        assert float(weighted_fid(x, y, row[None], torch.ones(1, 12, dtype=torch.float64))) == pytest.approx(
            features_fid(dup_x, y), rel=1e-8
        )


def expected_kernel(mean_x: float, mean_y: float, var: float, n: int = 2_000_000) -> float:
    """E[(x·y/d + 1)³] for independent x ~ N(mean_x, var I), y ~ N(mean_y, var I): exact in y given
    x (x·y is normal: E[(u + sZ)³] = u³ + 3u s²), Monte Carlo over x."""
    g = torch.Generator().manual_seed(123)
    x = mean_x + torch.randn(n, D, generator=g, dtype=torch.float64) * var**0.5
    u = x.sum(1) * mean_y / D + 1
    s2 = var * (x * x).sum(1) / D**2
    return float((u**3 + 3 * u * s2).mean())


def test_bootstrap_interval_covers_the_true_kid_difference_at_the_stated_rate():
    """Held-out prompts p have a latent c_p; the real image is c_p + noise, and the LoRA and the
    base model draw their image from the same seed (shared noise) but shifted differently. The
    true LoRA − base KID difference is known from the distributions; over 600 simulated
    evaluations of 40 prompts the 95% interval must contain it 90-100% of the time."""
    n, tau, s_lora, s_base = 40, 0.7, 0.3, 0.6
    var = 1 + tau**2
    truth = (
        expected_kernel(s_lora, s_lora, var) - expected_kernel(s_base, s_base, var)
        - 2 * expected_kernel(0.0, s_lora, var) + 2 * expected_kernel(0.0, s_base, var)
    )
    g = torch.Generator().manual_seed(7)
    prompts = torch.arange(n)
    hits, reps = 0, 600
    k = polynomial_kernel
    for rep in range(reps):
        c = torch.randn(n, D, generator=g, dtype=torch.float64) * tau
        real = c + torch.randn(n, D, generator=g, dtype=torch.float64)
        noise = torch.randn(n, D, generator=g, dtype=torch.float64)
        lora, base = c + s_lora + noise, c + s_base + noise
        w = bootstrap_weights(n, 1000, seed=rep)
        krr = k(real, real)
        diff = weighted_mmd2(krr, k(lora, lora), k(real, lora), w, w, prompts, prompts) - weighted_mmd2(
            krr, k(base, base), k(real, base), w, w, prompts, prompts
        )
        low, high = percentile_interval(diff)
        hits += low <= truth <= high
    coverage = hits / reps
    print(f"coverage {coverage:.3f} over {reps} simulated evaluations")
    assert 0.90 <= coverage <= 1.0, coverage
