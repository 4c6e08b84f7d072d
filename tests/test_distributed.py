"""Beyond one process: a 2-process run (gloo on CPU), and sweeps through Hydra's submitit launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from ghibli_lab.config import register_configs

from .conftest import CONF_DIR

ARGS = [
    "experiment=demo", "logger=none", "train.val_every=2", "train.log_every=1", "dataset.num_images=20",
    "dataset.random_flip=true", "scheduler.steps=2", "sample.seeds=[0]", "sample.prompts=[a hill]",
    "train.max_steps=6", "train.checkpoint_every=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """2 processes x batch 2 == 1 process x batch 4: same samples per step (accelerate shards the
    loader), same noise (drawn for the global batch, see loss.shard_randn), averaged gradients.
    Tolerance: 1e-5 relative, for the different order of float sums across processes."""
    env = {**os.environ, "GHIBLI_LAB_CACHE": str(tmp_path / "cache"), "ACCELERATE_USE_CPU": "true"}
    single = subprocess.run(
        [sys.executable, "-m", "ghibli_lab.train", *ARGS, "train.batch_size=4", f"hydra.run.dir={tmp_path / 'single'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "ghibli_lab.train", *ARGS, "train.batch_size=2", f"output_root={tmp_path / 'out'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    run_dirs = list((tmp_path / "out" / "runs").glob("*/*"))
    assert len(run_dirs) == 1, run_dirs  # both ranks resolved one run dir
    run = run_dirs[0]
    assert sorted(p.name for p in (run / "lora").iterdir()) == ["lora_kohya.safetensors", "pytorch_lora_weights.safetensors"]
    a, b = rows(tmp_path / "single" / "metrics.jsonl"), rows(run / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train/loss", "val/loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra, rb)
    wa = load_file(tmp_path / "single" / "lora" / "pytorch_lora_weights.safetensors")
    wb = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    # Float-sum order differs by ~1e-7; Adam's early steps move each weight by about ±lr whatever
    # the gradient's size, so the weights agree to steps x lr (6 x 1e-3), far below their scale.
    assert all(float((wa[k] - wb[k]).abs().max()) < 6e-3 for k in wa)


def test_submitit_local_sweep_runs_each_job_in_its_own_process(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    # The two jobs run at once: one thread each, or their spinning OpenMP threads crawl on 2 cores.
    env = {**os.environ, "GHIBLI_LAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ghibli_lab.train", "-m", "hydra/launcher=submitit_local", "experiment=demo",
         "logger=none", "lora.rank=4,8", "train.max_steps=3", "train.val_every=3", "train.checkpoint_every=0",
         "dataset.num_images=8", "scheduler.steps=2", "sample.seeds=[0]"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "outputs" / "latest"
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert runs == ["0_lora.rank-4", "1_lora.rank-8"]
    for run in runs:
        summary = json.loads((sweep / run / "summary.json").read_text())
        assert summary["lora/rank"] == int(run.split("-")[-1]) and summary["steps"] == 3
        assert (sweep / run / "lora" / "lora_kohya.safetensors").is_file()
    assert list((sweep / ".submitit").iterdir())  # the jobs really went through submitit


def test_slurm_preset_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm_1gpu", "train.resume=auto"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0 and launcher.array_parallelism > 0
    assert cfg.train.resume == "auto"


@pytest.mark.slow  # ~2.5 min: the launcher's pre-timeout signal comes 30 s into a 1-minute limit
def test_submitit_requeue_on_the_pre_timeout_signal_ends_identical_to_an_uninterrupted_run(tmp_path):
    """submitit's local launcher with a 1-minute limit sends its pre-timeout signal (USR2) 30 s in:
    the trainer finishes the step, checkpoints and hands the signal to submitit, which requeues the
    job; train.resume=auto continues it. The result equals a run that was never interrupted."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = {**os.environ, "GHIBLI_LAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["experiment=demo", "logger=none", "train.max_steps=400", "train.val_every=100", "train.log_every=25",
            "train.checkpoint_every=0", "dataset.num_images=12", "scheduler.steps=2", "sample.seeds=[0]",
            "sample.prompts=[a hill]", "train.resume=auto"]

    def run(*extra: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "ghibli_lab.train", *extra, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(f"hydra.run.dir={tmp_path / 'straight'}")
    run("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=1", f"hydra.sweep.dir={tmp_path / 'requeued'}")
    (job,) = [p for p in (tmp_path / "requeued").iterdir() if p.name.startswith("0_")]
    summary = json.loads((job / "summary.json").read_text())
    assert summary["steps"] == 400 and summary["resumed_from"]  # it was interrupted and continued
    assert (tmp_path / "straight" / "metrics.jsonl").read_text() == (job / "metrics.jsonl").read_text()
    a = load_file(tmp_path / "straight" / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(job / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
