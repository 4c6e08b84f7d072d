"""Search past the grid: ``hydra/sweeper=optuna`` (experiment=optuna_demo) minimises held-out
``val/loss`` over lr, rank and alpha, offline; its sweep dir names its runs by the searched keys and
the report reads it like a grid's."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

from omegaconf import OmegaConf

from ghibli_lab.config import swept_values

from .conftest import ROOT

RANKS = ALPHAS = {4, 8, 16}
LR_LOW, LR_HIGH = 1e-4, 3e-3


def test_sweeper_search_space_names_the_sub_dirs(monkeypatch):
    """Under Optuna the trial's values come from ``hydra.sweeper.params``, not the command line: the
    sub-dir holds those keys only, not the fixed overrides (paths, experiment, logger)."""
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "experiment=optuna_demo", "output_root=/tmp/x y", "logger=none"])
    root = OmegaConf.create({"hydra": {"sweeper": {"params": {
        "train.lr": "tag(log, interval(1e-4, 3e-3))", "lora.rank": "choice(4, 8, 16)", "lora.alpha": "choice(4, 8, 16)"}}}})
    task = ["train.lr=0.0003", "lora.rank=4", "lora.alpha=8", "experiment=optuna_demo", "output_root=/tmp/x y", "logger=none"]
    assert swept_values(task, None, root) == "lora.alpha-8_lora.rank-4_train.lr-0.0003"
    # a search space given on the command line instead, and the basic sweeper's grid, as before
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "lora.rank=choice(4,8)", "output_root=/tmp/x"])
    assert swept_values(["lora.rank=8", "output_root=/tmp/x"], None, OmegaConf.create({"hydra": {"sweeper": {"params": None}}})) == "lora.rank-8"
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "lora.rank=4,8", "lora.alpha=8"])
    assert swept_values(["lora.rank=4", "lora.alpha=8"]) == "lora.rank-4"


def test_three_trial_optuna_study_minimises_val_loss_and_reports_like_a_grid(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = run("ghibli_lab.train", "-m", "experiment=optuna_demo", "hydra.sweeper.n_trials=3",
              f"output_root={tmp_path}", f"cache_dir={tmp_path / 'cache'}", "logger=none")
    assert out.returncode == 0, out.stderr[-3000:]
    (sweep,) = (tmp_path / "sweeps").glob("*/*")

    runs = sorted(p.parent for p in sweep.glob("*/summary.json"))
    assert len(runs) == 3, sorted(p.name for p in sweep.iterdir())
    trials = []
    for run_dir in runs:
        # the sub-dir names the searched keys only: <n>_lora.alpha-<a>_lora.rank-<r>_train.lr-<lr>
        m = re.fullmatch(r"(\d)_lora\.alpha-(\d+)_lora\.rank-(\d+)_train\.lr-([0-9.e+-]+)", run_dir.name)
        assert m, run_dir.name
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        trial = {"lr": cfg.train.lr, "rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
                 "val_loss": json.loads((run_dir / "summary.json").read_text())["val/loss"]}
        assert (int(m[2]), int(m[3]), float(m[4])) == (trial["alpha"], trial["rank"], trial["lr"])
        assert trial["rank"] in RANKS and trial["alpha"] in ALPHAS and LR_LOW <= trial["lr"] <= LR_HIGH, trial
        assert cfg.train.max_steps == 40 and cfg.model.pretrained == "tiny"  # the demo's settings
        assert math.isfinite(trial["val_loss"])
        trials.append(trial)
    for key in ("lr", "rank", "alpha"):  # sampled, not fixed: every searched key varies
        assert len({t[key] for t in trials}) > 1, (key, trials)

    results = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))
    best = min(trials, key=lambda t: t["val_loss"])
    assert results["best_value"] == best["val_loss"]  # what train.main returned: summary.json's val/loss
    assert results["best_params"] == {"train.lr": best["lr"], "lora.rank": best["rank"], "lora.alpha": best["alpha"]}

    out = run("ghibli_lab.report", f"sweep_dir={sweep}", "wandb=false")
    assert out.returncode == 0, out.stderr[-3000:]
    html = (sweep / "report" / "index.html").read_text()
    assert "3 runs; swept: lora.alpha × lora.rank × train.lr" in html
    assert "Axes: lora.alpha × lora.rank × train.lr" in html
    for run_dir in runs:
        assert run_dir.name in html
    assert (sweep / "report" / "heatmap_train_val_loss.png").is_file()
