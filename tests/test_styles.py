"""Multi-style datasets: one adapter per style folder from one sweep, and the style-separation
matrix that shows which style each adapter moved towards."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from ghibli_lab.data import make_synthetic_image, prepare_image
from ghibli_lab.evaluate import evaluate
from ghibli_lab.metrics import Features, style_separation, unpaired_kid
from ghibli_lab.pipeline import build_tiny_pipeline
from ghibli_lab.report import report
from ghibli_lab.train import train

from .conftest import compose_train
from .test_evaluate import EVAL_ARGS, compose_eval


def features(mean: float, n: int, seed: int) -> Features:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 16, generator=g, dtype=torch.float64) + mean
    return Features(image=image, clip=torch.zeros(n, 4, dtype=torch.float64))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_tiny_vae_keeps_each_style_visible(family):
    """The tiny models' VAE decodes what it encodes: each synthetic image comes back as its own 8x8
    block averages (so a learned style can show in images), with latents of about unit variance."""
    pipe = build_tiny_pipeline(family)
    images = torch.stack([prepare_image(make_synthetic_image(i, 64)[0], 64, True, False)[0] for i in range(4)])
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.sample() * pipe.vae.config.scaling_factor
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    blocks = torch.nn.functional.avg_pool2d(images, 8).repeat_interleave(8, 2).repeat_interleave(8, 3)
    assert latents.shape == (4, 4, 8, 8) and 0.5 < latents[:, :3].std() < 2
    assert (decoded - blocks).abs().max() < 1e-3
    assert (images[0] - images[1]).abs().mean() > 0.2 and (decoded[0] - decoded[1]).abs().mean() > 0.2  # watercolor vs comic


def test_the_matrix_marks_the_style_each_adapter_is_closest_to():
    """Two styles far apart in feature space; adapter a generates like style A, b like B."""
    reals = {"A": features(0.0, 30, 1), "B": features(3.0, 30, 2)}
    rows = {"run_a": ("A", features(0.0, 30, 3)), "run_b": ("B", features(0.0, 30, 4))}
    m = style_separation(rows, reals, draws=200, seed=0)
    assert m["styles"] == ["A", "B"]
    a, b = m["runs"]["run_a"], m["runs"]["run_b"]
    assert a["lowest_is_own"] and a["clearly"] and a["kid"]["A"]["low"] <= a["kid"]["A"]["kid"] <= a["kid"]["A"]["high"]
    assert not b["lowest_is_own"] and not b["clearly"]  # b generates style A: its row says so
    # Same distributions: KID near zero, and its interval covers zero.
    same = unpaired_kid(features(0.0, 40, 5), features(0.0, 40, 6), draws=300)
    assert same["low"] < 0 < same["high"]


def train_style_sweep(sweep, cache_dir, overrides: list[str]) -> list:
    """One run per synthetic style, laid out as the `dataset.style=watercolor,comic` multirun would."""
    runs = []
    for i, style in enumerate(["watercolor", "comic"]):
        cfg = compose_train([*overrides, "logger=none", f"dataset.style={style}", f"cache_dir={cache_dir}"])
        run = sweep / f"{i}_dataset.style-{style}"
        (run / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
        train(cfg, run)
        runs.append((style, run))
    return runs


def test_a_style_sweep_gets_a_matrix_in_evaluation_and_report(tmp_path):
    sweep = tmp_path / "sweep"
    runs = train_style_sweep(sweep, tmp_path / "cache", [
        "experiment=demo", "model=tiny_sd15", "dataset.num_images=40", "train.max_steps=2", "train.val_every=0",
        "train.checkpoint_every=0", "scheduler.steps=2", "sample.seeds=[0]", "sample.prompts=[a hill]",
    ])
    for style, run in runs:
        held = json.loads((run / "split.json").read_text())["holdout"]
        assert held and all(style in name for _, name in held)  # each run holds out its own style's images
    evaluate(compose_eval(f"run_dir={sweep}", *EVAL_ARGS, "eval.bootstrap_draws=200"))
    matrix = json.loads((sweep / "style_matrix.json").read_text())
    assert matrix["styles"] == ["comic", "watercolor"]
    assert {r["style"] for r in matrix["runs"].values()} == {"comic", "watercolor"}
    for row in matrix["runs"].values():
        for cell in row["kid"].values():
            assert cell["low"] <= cell["high"]
    assert "| 0_dataset.style-watercolor (watercolor) |" in (sweep / "style_matrix.md").read_text()
    report(compose_train([f"sweep_dir={sweep}", "wandb=false"], config_name="report"))
    assert "Style separation" in (sweep / "report" / "index.html").read_text()


@pytest.mark.slow  # ~2 min on 2 cores: 2 x 300 LoRA steps, then 40 images sampled at 20 steps
def test_the_multistyle_demo_puts_each_adapter_closest_to_its_own_style(tmp_path):
    """`make multistyle-demo` as it ships: the watercolor adapter's images are closer (KID on the
    tiny features) to held-out watercolors than to held-out comics, and the comic adapter's the
    other way round, so the matrix's diagonal beats its off-diagonal."""
    sweep = tmp_path / "sweep"
    train_style_sweep(sweep, tmp_path / "cache", ["experiment=multistyle_demo"])
    evaluate(compose_eval(f"run_dir={sweep}"))
    matrix = json.loads((sweep / "style_matrix.json").read_text())
    for name, row in matrix["runs"].items():
        own = row["kid"][row["style"]]["kid"]
        others = [cell["kid"] for style, cell in row["kid"].items() if style != row["style"]]
        assert row["lowest_is_own"] and own < min(others), (name, row["kid"])
