"""Mechanics the seed studies need: early stopping on held-out val/loss (the best weights kept and
marked), the CFG-guided training loss, and sampling-only sweeps that train once."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from ghibli_lab.loss import training_loss, empty_prompt_embeddings
from ghibli_lab.pipeline import build_tiny_pipeline, training_scheduler
from ghibli_lab.train import train

from .conftest import compose_train

FAST = ["experiment=demo", "logger=none", "model=tiny_sd15", "train.batch_size=2", "train.val_every=1", "train.checkpoint_every=0",
        "train.log_every=1", "dataset.num_images=20", "scheduler.steps=2", "sample.seeds=[0]", "sample.prompts=[a hill]", "lora.save_dtype=fp32"]


def test_early_stopping_stops_on_held_out_loss_and_keeps_the_best_weights(tmp_path):
    """With patience 2 the run stops two validations after its best val/loss (lr 0.05 on the tiny
    model: best at step 3, then worse twice) and exports exactly the weights a run that ends at
    the best step exports."""
    args = [*FAST, f"cache_dir={tmp_path / 'cache'}", "train.lr=0.05"]
    stopped = train(compose_train([*args, "train.max_steps=10", "train.early_stop_patience=2"]), tmp_path / "stopped")
    vals = [row["val/loss"] for row in map(json.loads, open(tmp_path / "stopped" / "metrics.jsonl")) if "val/loss" in row]
    best = stopped["weights_step"]
    assert stopped["early_stopped"] and best >= 1 and stopped["steps"] == best + 2 < 10
    assert vals[best] == min(vals) == stopped["val/loss_best"] and all(v > vals[best] for v in vals[best + 1:])
    at_best = train(compose_train([*args, f"train.max_steps={best}"]), tmp_path / "at_best")
    assert not at_best["early_stopped"] and at_best["weights_step"] == best
    name = "lora/pytorch_lora_weights.safetensors"
    assert (tmp_path / "stopped" / name).read_bytes() == (tmp_path / "at_best" / name).read_bytes()


def test_early_stopping_resumes_with_its_best_weights(tmp_path):
    args = [*FAST, f"cache_dir={tmp_path / 'cache'}", "train.lr=0.05", "train.early_stop_patience=2", "train.checkpoint_every=2"]
    straight = train(compose_train([*args, "train.max_steps=10"]), tmp_path / "straight")
    train(compose_train([*args, "train.max_steps=2"]), tmp_path / "resumed")
    resumed = train(compose_train([*args, "train.max_steps=10", "train.resume=auto"]), tmp_path / "resumed")
    assert straight["early_stopped"] and resumed["early_stopped"]
    assert (straight["steps"], straight["weights_step"]) == (resumed["steps"], resumed["weights_step"])
    assert straight["weights_step"] < straight["steps"]  # the best weights are not the last ones
    name = "lora/pytorch_lora_weights.safetensors"
    assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


def test_early_stopping_needs_validation(tiny_cfg):
    from ghibli_lab.config import ConfigError, check_config

    with pytest.raises(ConfigError, match=r"train.early_stop_patience=3 needs .* \(train.val_every >= 1, got 0\)"):
        check_config(tiny_cfg("train.early_stop_patience=3", "train.val_every=0"))


def test_the_guided_loss_trains_uncond_plus_g_times_cond_minus_uncond():
    """The loss is the MSE of u + g(c − u) against the noise: g = 1 is the standard loss, and as
    a function of g it is a quadratic (its third finite difference is zero) whose g = 0 value is
    the empty prompt's own loss."""
    pipe = build_tiny_pipeline("sd15")
    scheduler = training_scheduler(pipe)
    batch = {"pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1, "caption": ["a watercolor hill", "a comic city"],
             "original_size": torch.tensor([[64, 64]] * 2), "crop_top_left": torch.tensor([[0, 0]] * 2)}
    uncond = empty_prompt_embeddings(pipe)

    def loss(g: float, b: dict = batch) -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return training_loss(pipe, b, scheduler, torch.float32, guidance=g, uncond=uncond).double().mean().item()

    standard = loss(1.0)
    torch.manual_seed(0)
    with torch.no_grad():
        assert standard == training_loss(pipe, batch, scheduler, torch.float32).double().mean().item()
    l0, l1, l2, l3 = (loss(g) for g in (0.0, 1.0, 2.0, 3.0))
    assert l3 - 3 * l2 + 3 * l1 - l0 == pytest.approx(0.0, abs=1e-5 * max(l0, l1, l2, l3))
    assert l2 != pytest.approx(l1)  # the guidance changes what is trained
    assert l0 == pytest.approx(loss(1.0, {**batch, "caption": ["", ""]}), rel=1e-5)  # g = 0: the empty prompt alone


def test_a_guided_loss_run_trains(tmp_path):
    s = train(compose_train([*FAST, f"cache_dir={tmp_path / 'cache'}", "train.max_steps=2", "train.loss_guidance=7.5"]), tmp_path / "run")
    assert s["steps"] == 2 and s["train/loss"] is not None


def test_a_sweep_over_sampling_keys_trains_once_and_evaluates_each_setting(tmp_path):
    """scheduler=ddpm,ddim x guidance.scale=1,7.5: one job trains, the other three reuse its
    weights (summary.json's trained_by) and only sample; evaluation then samples every run with
    its own sampler and guidance."""
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "ghibli_lab.train", "-m", "experiment=demo", "model=tiny_sd15", "logger=none",
         "scheduler=ddpm,ddim", "guidance.scale=1,7.5", "train.max_steps=3", "dataset.num_images=20", "train.val_every=0",
         f"output_root={tmp_path}", f"cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (sweep,) = (tmp_path / "sweeps").glob("*/*")
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    summaries = {r.name: json.loads((r / "summary.json").read_text()) for r in runs}
    trained = [name for name, s in summaries.items() if "trained_by" not in s]
    assert len(runs) == 4 and len(trained) == 1
    assert all(s["trained_by"] == trained[0] for name, s in summaries.items() if name not in trained)
    reused = [r for r in runs if r.name not in trained]
    assert all("reusing its weights, sampling only" in (r / "train.log").read_text() for r in reused)
    weights = {(r / "lora" / "lora_kohya.safetensors").read_bytes() for r in runs}
    assert len(weights) == 1  # the same adapter everywhere
    samples = {(r / "samples" / "final.png").read_bytes() for r in runs}
    assert len(samples) == 4  # but each job's own sampling

    from ghibli_lab.evaluate import evaluate

    from .test_evaluate import compose_eval

    evaluate(compose_eval(f"run_dir={sweep}", "eval.features=tiny", "eval.steps=2", "eval.bootstrap_draws=100"))
    for r in runs:
        cfg = OmegaConf.load(r / ".hydra" / "config.yaml")
        protocol = json.loads((r / "eval" / "metrics.json").read_text())["protocol"]
        assert (protocol["scheduler"], protocol["guidance_scale"]) == (cfg.scheduler.name, cfg.guidance.scale)
