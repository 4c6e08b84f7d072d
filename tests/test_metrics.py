"""ghibli_lab.metrics: KID/FID/CLIP score on tiny random feature models, and the Inception file handling."""

from __future__ import annotations

import io
import math
import urllib.error

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.image.kid import KernelInceptionDistance

from ghibli_lab import metrics
from ghibli_lab.metrics import (
    INCEPTION_FILE,
    INCEPTION_URL,
    FeatureUnavailable,
    clean_resize,
    compute_image_metrics,
    file_sha256,
    frechet_distance,
    kid_unbiased,
    Features,
    Sample,
    clip_text_embeddings,
    load_feature_models,
    score,
)

RESULT_KEYS = {
    "kid", "kid_subset_std", "fid", "cmmd", "clip_score", "diversity", "n_real", "n_fake",
    "kid_subset_size", "kid_subset_clamped", "fid_n_warning",
}  # fmt: skip


def images(n: int, seed: int, shift: float = 0.0, size: int = 32) -> torch.Tensor:
    """One distribution of uint8 images: per-image brightness and tint plus pixel noise, + ``shift``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 1, 1, generator=g) * 120 + torch.rand(n, 3, 1, 1, generator=g) * 30
    noise = torch.rand(n, 3, size, size, generator=g) * 100
    return (base + noise + shift).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def fm():
    return load_feature_models("tiny", cache_dir="unused")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, fm):
    """The tiny CLIP saved like a downloaded model, to load through the hub-id/local-dir path."""
    path = tmp_path_factory.mktemp("tiny-clip")
    fm.clip_model.save_pretrained(path)
    fm.clip_processor.save_pretrained(path)
    return path


class StandInInception(nn.Module):
    """Same call signature as clean-fid's TorchScript Inception: ``layers`` maps 299 px to 2048-d."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 2048))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def save_stand_in(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with pytest.warns(DeprecationWarning):  # torch.jit is deprecated, but it is clean-fid's format
            torch.jit.script(StandInInception()).save(str(path))
    return path


# ----------------------------------------------------------------------------------------------
# FID and KID


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_colour_shift(fm):
    real = images(16, seed=0)
    prompts = ["a hill"] * 16
    self_fid = compute_image_metrics(real, real, prompts, fm)["fid"]
    shifted = [images(16, seed=1, shift=s) for s in (0, 20, 40, 80)]
    fids = [compute_image_metrics(real, fake, prompts, fm)["fid"] for fake in shifted]
    assert abs(self_fid) < 1e-3 * fids[0]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_is_unbiased_for_two_samples_of_one_distribution(fm):
    """The unbiased MMD² averages to 0 over independent draws (a biased estimate would be > 0)."""

    def kid_draws(shift: float) -> torch.Tensor:
        scores = []
        for draw in range(20):
            kid = KernelInceptionDistance(feature=fm.image, subset_size=10)
            kid.update(images(10, seed=2 * draw), real=True)
            kid.update(images(10, seed=2 * draw + 1, shift=shift), real=False)
            scores.append(float(kid.compute()[0]))
        return torch.tensor(scores)

    same, shifted = kid_draws(0.0), kid_draws(60.0)
    stderr = lambda x: float(x.std()) / math.sqrt(len(x))  # noqa: E731
    assert abs(float(same.mean())) < 1.0 * stderr(same)
    assert float(shifted.mean()) > 3.0 * stderr(shifted)  # the same test does detect a real difference


def test_kid_subset_size_is_clamped_to_the_sample_size_and_reported(fm):
    real, fake = images(6, seed=0), images(8, seed=1)
    clamped = compute_image_metrics(real, fake, ["x"] * 8, fm, kid_subset_size=1000)
    assert clamped["kid_subset_size"] == 6 and clamped["kid_subset_clamped"] is True
    kept = compute_image_metrics(real, fake, ["x"] * 8, fm, kid_subset_size=4)
    assert kept["kid_subset_size"] == 4 and kept["kid_subset_clamped"] is False


def test_compute_image_metrics_returns_every_key_as_finite_plain_numbers(fm):
    real, fake = images(10, seed=0), images(12, seed=1, size=48)  # sizes differ: each resizes itself
    result = compute_image_metrics(real, fake, ["a hill at dusk"] * 12, fm)
    assert set(result) == RESULT_KEYS
    for key in ("kid", "kid_subset_std", "fid", "cmmd", "clip_score"):
        assert type(result[key]) is float and math.isfinite(result[key]), key
    assert result["diversity"] is None  # unpaired sets: no prompts to measure diversity within
    assert (result["n_real"], result["n_fake"]) == (10, 12)
    assert "N=10 < 2048" in result["fid_n_warning"]


def test_metrics_are_reproducible_and_leave_the_global_rng_alone(fm):
    real, fake = images(12, seed=0), images(12, seed=1)
    state = torch.get_rng_state()
    first = compute_image_metrics(real, fake, ["x"] * 12, fm, kid_subset_size=8)
    second = compute_image_metrics(real, fake, ["x"] * 12, fm, kid_subset_size=8)
    assert first == second
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_inputs_fail_with_one_clear_message(fm):
    with pytest.raises(ValueError, match="one prompt per fake image"):
        compute_image_metrics(images(4, 0), images(4, 1), ["x"] * 3, fm)
    with pytest.raises(ValueError, match="uint8"):
        compute_image_metrics(images(4, 0).float(), images(4, 1), ["x"] * 4, fm)
    with pytest.raises(ValueError, match="at least 2 fake"):
        compute_image_metrics(images(4, 0), images(1, 1), ["x"], fm)


# ----------------------------------------------------------------------------------------------
# CLIP


def test_clip_score_runs_with_the_transformers_5_fix(fm):
    pixels = fm.clip_processor(images=list(images(2, seed=0)), return_tensors="pt")["pixel_values"]
    assert isinstance(fm.clip_model.get_image_features(pixel_values=pixels), torch.Tensor)
    value = metrics.clip_score(images(4, seed=0), ["a hill", "a tree", "a house", "a cat"], fm)
    assert type(value) is float and math.isfinite(value)
    # Not clamped at 0: the mean of 100 x cos over the pairs, whatever its sign.
    expected = 100 * (metrics.clip_image_embeddings(images(4, seed=0), fm) * clip_text_embeddings(["a hill", "a tree", "a house", "a cat"], fm)).sum(1).mean()
    assert value == pytest.approx(float(expected), rel=1e-6)


def test_two_different_long_prompts_get_different_clip_text_embeddings(fm):
    """Prompts longer than CLIP's 77 tokens are truncated by the tokenizer with the end token
    kept; cutting the token ids instead (torchmetrics 1.9) pools both at the start token."""
    a = "a quiet harbour town at dusk with fishing boats, lanterns on the pier and gulls over the water, " * 2
    b = "a girl in a red dress runs through a windy meadow of tall grass under towering summer clouds, " * 2
    tokenizer = fm.clip_processor.tokenizer
    assert len(tokenizer(a).input_ids) > 77 and len(tokenizer(b).input_ids) > 77
    emb = clip_text_embeddings([a, b], fm)
    assert not torch.allclose(emb[0], emb[1], atol=1e-4)
    # What cutting the ids does: no end token left, every such prompt pools at position 0.
    ids = tokenizer([a, b], padding=True, return_tensors="pt").input_ids[:, :77]
    with torch.no_grad():
        cut = fm.clip_model.get_text_features(input_ids=ids)
    assert torch.allclose(cut[0], cut[1])


def clip_sample(real: torch.Tensor, fake: torch.Tensor) -> Sample:
    """Real and generated CLIP embeddings as evaluation pairs them: generated image i for prompt i."""
    return Sample(Features(real, real), Features(fake, fake), prompt_of=torch.arange(len(fake)))


def test_a_collapsed_set_scores_worse_than_the_real_set():
    """Twelve copies of the most central real image: the old style similarity (mean cosine to the
    real set) ranked it above the real set itself; CMMD and diversity both rank it worse."""
    g = torch.Generator().manual_seed(0)
    real = torch.nn.functional.normalize(torch.randn(12, 16, generator=g, dtype=torch.float64) + 1.5, dim=-1)
    central = (real @ real.T).mean(1).argmax()
    copies = real[central].repeat(12, 1)
    old_style_sim = lambda fake: float((fake @ real.T).mean())  # noqa: E731
    assert old_style_sim(copies) > old_style_sim(real)  # the failure the registry no longer has
    honest, collapsed = score(clip_sample(real, real)), score(clip_sample(real, copies))
    assert collapsed["cmmd"] > honest["cmmd"] + 1.0
    assert abs(honest["cmmd"]) < 0.5  # unbiased: about 0 for the real set against itself


def test_diversity_is_zero_for_identical_images_per_prompt():
    g = torch.Generator().manual_seed(1)
    real = torch.nn.functional.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1)
    varied = torch.nn.functional.normalize(torch.randn(8, 8, generator=g, dtype=torch.float64), dim=-1)
    prompts = torch.arange(4).repeat_interleave(2)
    same = real.repeat_interleave(2, dim=0)
    assert score(Sample(Features(real, real), Features(same, same), prompt_of=prompts))["diversity"] == pytest.approx(0, abs=1e-12)
    assert score(Sample(Features(real, real), Features(varied, varied), prompt_of=prompts))["diversity"] > 0.3


# ----------------------------------------------------------------------------------------------
# Loading


def test_tiny_features_are_deterministic_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = load_feature_models("tiny", "unused"), load_feature_models("tiny", "unused")
    assert torch.equal(torch.get_rng_state(), state)
    x = images(3, seed=0)
    with torch.no_grad():
        assert torch.equal(a.image(x), b.image(x))
        assert torch.equal(metrics.clip_image_embeddings(x, a), metrics.clip_image_embeddings(x, b))
    assert a.protocol == b.protocol and a.protocol["image_features"]["name"] == "tiny"


def test_clean_resize_is_float_bicubic_and_keeps_flat_colours():
    flat = torch.full((2, 3, 17, 23), 200, dtype=torch.uint8)
    out = clean_resize(flat, 29)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 29, 29)
    assert torch.allclose(out, torch.full_like(out, 200.0))
    # Bicubic overshoot at a hard edge is clipped to the pixel range, as clean-fid does.
    edge = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    edge[..., 4:] = 255
    resized = clean_resize(edge, 21)
    assert resized.min() >= 0 and resized.max() <= 255 and 0 < resized[0, 0, 0, 10] < 255


def test_inception_offline_names_the_file_the_folder_and_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(metrics, "reachable", lambda url, timeout=3.0: False)
    with pytest.raises(FeatureUnavailable) as err:
        load_feature_models("inception", cache_dir=tmp_path)
    message = str(err.value)
    assert INCEPTION_FILE in message and str(tmp_path / "features") in message
    assert INCEPTION_URL in message and "eval.inception_path=" in message


def test_a_failed_download_leaves_no_partial_file(tmp_path, monkeypatch):
    def refuse(url, timeout=None):
        raise urllib.error.URLError("connection refused")

    monkeypatch.setattr(metrics, "reachable", lambda url, timeout=3.0: True)
    monkeypatch.setattr(metrics.urllib.request, "urlopen", refuse)
    with pytest.raises(FeatureUnavailable, match="connection refused"):
        load_feature_models("inception", cache_dir=tmp_path)
    assert list((tmp_path / "features").iterdir()) == []


def test_a_file_with_the_wrong_sha256_is_refused_clearly(tmp_path):
    path = save_stand_in(tmp_path / "features" / INCEPTION_FILE)
    with pytest.raises(FeatureUnavailable) as err:
        load_feature_models("inception", cache_dir=tmp_path)
    message = str(err.value)
    assert str(path) in message and file_sha256(path) in message and metrics.INCEPTION_SHA256 in message


def test_inception_path_downloads_verifies_and_runs_clean_fid_input(tmp_path, monkeypatch, tiny_clip_dir):
    """A stand-in file goes through download, sha256 check, torch.jit.load and the metrics."""
    stand_in = save_stand_in(tmp_path / "elsewhere" / INCEPTION_FILE)
    payload = stand_in.read_bytes()
    monkeypatch.setattr(metrics, "INCEPTION_SHA256", file_sha256(stand_in))
    monkeypatch.setattr(metrics, "reachable", lambda url, timeout=3.0: True)
    monkeypatch.setattr(metrics.urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(payload))

    fm = load_feature_models("inception", cache_dir=tmp_path / "cache", clip_model=str(tiny_clip_dir))
    assert (tmp_path / "cache" / "features" / INCEPTION_FILE).read_bytes() == payload
    assert fm.protocol["image_features"]["sha256"] == file_sha256(stand_in)
    assert fm.protocol["resize"] == "clean-fid: PIL bicubic, float32, 299x299"

    x = images(3, seed=0, size=40)
    with pytest.warns(DeprecationWarning):
        scripted = torch.jit.load(str(stand_in))
    with torch.no_grad():
        expected = scripted.layers((clean_resize(x, 299) - 128) / 128)  # clean-fid's normalisation
        assert torch.allclose(fm.image(x), expected)
    result = compute_image_metrics(images(4, seed=1), images(4, seed=2), ["x"] * 4, fm)
    assert all(math.isfinite(result[k]) for k in ("kid", "fid", "cmmd", "clip_score"))


def test_clip_features_load_from_a_local_directory(tiny_clip_dir, fm):
    clip_fm = load_feature_models("clip", cache_dir="unused", clip_model=str(tiny_clip_dir))
    assert clip_fm.image.num_features == 32
    assert clip_fm.protocol["clip"]["sha256"] == fm.protocol["clip"]["sha256"]  # the same weights
    result = compute_image_metrics(images(6, seed=0), images(6, seed=1), ["x"] * 6, clip_fm)
    assert math.isfinite(result["kid"]) and math.isfinite(result["fid"])


def test_uncached_clip_offline_names_the_model_and_the_override(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FeatureUnavailable, match=r"(?s)nobody/no-such-clip.*eval\.clip_model="):
        load_feature_models("clip", cache_dir=tmp_path, clip_model="nobody/no-such-clip")


# ----------------------------------------------------------------------------------------------
# Formulas


def random_features(seed: int, n: int = 40, d: int = 8, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def stats(feats: np.ndarray):
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def test_frechet_distance_matches_the_closed_form_and_torchmetrics_fid(fm):
    f1, f2 = random_features(0), random_features(1, shift=0.5)
    (mu1, s1), (mu2, s2) = stats(f1), stats(f2)
    # Tr((S1 S2)^½) = Tr((S1^½ S2 S1^½)^½), computed with symmetric eigendecompositions only.
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_kid_unbiased_with_full_subsets_is_the_unbiased_mmd():
    f1, f2 = random_features(0), random_features(1, shift=0.3)
    d, m = f1.shape[1], len(f1)
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731  (Bińkowski et al. 2018, eq. for KID)
    kxx, kyy, kxy = k(f1, f1), k(f2, f2), k(f1, f2)
    expected = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    assert kid_unbiased(f1, f2, subset_size=m) == pytest.approx(expected, rel=1e-9)


def test_formulas_agree_with_clean_fid():
    cleanfid_fid = pytest.importorskip("cleanfid.fid")  # needs torchvision: runs on a GPU box only
    f1, f2 = random_features(0), random_features(1, shift=0.5)
    (mu1, s1), (mu2, s2) = stats(f1), stats(f2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        cleanfid_fid.frechet_distance(mu1, s1, mu2, s2), rel=1e-6
    )
    # With the subset as large as the sets every draw is the full set, so the RNGs don't matter.
    assert kid_unbiased(f1, f2, subset_size=len(f1)) == pytest.approx(
        cleanfid_fid.kernel_distance(f1, f2, num_subsets=3, max_subset_size=len(f1)), rel=1e-6
    )
