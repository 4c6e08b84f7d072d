"""Reliability: exact resume, crash-safe checkpoints, preemption signals, non-finite losses,
and no secrets or pickles."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ghibli_lab import checkpoint
from ghibli_lab.loop import PREEMPTED_EXIT
from ghibli_lab.train import train

from .conftest import ROOT, compose_train

ARGS = [
    "experiment=demo", "logger=none", "train.batch_size=2", "train.val_every=2", "train.log_every=1",
    "dataset.num_images=12", "dataset.random_flip=true", "scheduler.steps=2", "sample.seeds=[0]",
    "sample.prompts=[a hill]", "train.lr_scheduler=cosine", "train.warmup_steps=2",
]


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")


def assert_same_run(a: Path, b: Path) -> None:
    """Identical metrics.jsonl (train/loss, val/loss, lr at every step) and identical LoRA weights."""
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("cache", ["true", "false"])
def test_resuming_a_checkpoint_reproduces_the_rest_exactly(tmp_path, cache):
    """N steps straight, and the same run resumed from its N/2 checkpoint, give identical losses
    and weights (with shuffling, random flips, warmup and a cosine schedule)."""
    args = [*ARGS, "train.max_steps=8", "train.checkpoint_every=4", f"train.cache={cache}", f"cache_dir={tmp_path / 'c'}"]
    train(compose_train(args), tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "lora")
    ckpt = tmp_path / "resumed" / "checkpoints" / "step_000004"
    summary = train(compose_train([*args, f"train.resume={ckpt}"]), tmp_path / "resumed")
    assert summary["resumed_from"] == str(ckpt)
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "GHIBLI_LAB_CACHE": str(cwd / "cache")}
    return subprocess.Popen(
        [sys.executable, "-m", "ghibli_lab.train", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return max((r["step"] for r in rows), default=0)


def test_sigterm_checkpoints_and_resume_auto_matches_an_uninterrupted_run(tmp_path):
    args = [*ARGS, "train.max_steps=30", "train.checkpoint_every=100"]
    straight = cli(*args, f"hydra.run.dir={tmp_path / 'straight'}", cwd=tmp_path)
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-3000:]

    run = tmp_path / "interrupted"
    proc = cli(*args, f"hydra.run.dir={run}", cwd=tmp_path)
    deadline = time.time() + 300
    while logged_steps(run) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == PREEMPTED_EXIT, proc.stderr.read()[-3000:]
    stopped_at = checkpoint.latest_checkpoint(run)[0]
    assert stopped_at is not None and 8 <= int(stopped_at.name.split("_")[1]) < 30
    assert not (run / "lora").exists()

    resumed = cli(*args, f"hydra.run.dir={run}", "train.resume=auto", cwd=tmp_path)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    assert_same_run(tmp_path / "straight", run)


def kill_during_a_checkpoint_write(args: list[str], run: Path, cwd: Path) -> bool:
    """Start a run, SIGKILL it while a checkpoint is being written (a temp dir exists and an
    earlier checkpoint is complete). True if the interrupted write was left behind: the save can
    finish its rename between our look and the kill, and then there is nothing partial to test."""
    proc = cli(*args, f"hydra.run.dir={run}", cwd=cwd)
    deadline = time.time() + 300
    killed = False
    while proc.poll() is None and time.time() < deadline:
        partial = list((run / "checkpoints").glob(".tmp-step_*")) if (run / "checkpoints").is_dir() else []
        if partial and checkpoint.latest_checkpoint(run)[0] is not None:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
    proc.wait(timeout=60)
    return killed and bool(list((run / "checkpoints").glob(".tmp-step_*")))


def test_kill_9_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path):
    args = [*ARGS, "train.max_steps=24", "train.checkpoint_every=1", "train.keep_checkpoints=2"]
    straight = cli(*args, f"hydra.run.dir={tmp_path / 'straight'}", cwd=tmp_path)
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-3000:]

    for attempt in range(6):
        run = tmp_path / f"killed{attempt}"
        if kill_during_a_checkpoint_write(args, run, tmp_path):
            break
    else:
        pytest.fail("never managed to kill a run in the middle of a checkpoint write")
    before = checkpoint.latest_checkpoint(run)[0]
    assert before is not None and (before / checkpoint.MARKER).is_file()

    resumed = cli(*args, f"hydra.run.dir={run}", "train.resume=auto", cwd=tmp_path)
    out = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[1][-3000:]
    assert "incomplete checkpoint" in out[0] + out[1]  # the interrupted write was reported, not used
    assert_same_run(tmp_path / "straight", run)
    assert len(list((run / "checkpoints").glob("step_*"))) <= 2  # pruned to keep_checkpoints
    assert not list((run / "checkpoints").glob(".tmp-step_*"))  # the leftover was cleaned up


def test_incomplete_checkpoints_are_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [("step_000002", True), ("step_000004", False), (".tmp-step_000006-99", False)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / checkpoint.MARKER).write_text("2")
    path, partial = checkpoint.latest_checkpoint(tmp_path)
    assert path == root / "step_000002"
    assert {p.name for p in partial} == {"step_000004", ".tmp-step_000006-99"}


def test_short_disk_space_skips_the_save_and_keeps_the_previous_checkpoint(tiny_cfg, tmp_path, monkeypatch, caplog):
    train(tiny_cfg("train.checkpoint_every=2", "train.max_steps=3"), tmp_path / "run")
    previous = checkpoint.latest_checkpoint(tmp_path / "run")[0]
    assert previous.name == "step_000002"
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    result = checkpoint.save_checkpoint(tmp_path / "run", 4, {}, None, None, None, {}, keep=1)
    assert result is None
    assert "not enough disk space" in caplog.text and "keeping step_000002" in caplog.text
    assert checkpoint.latest_checkpoint(tmp_path / "run")[0] == previous and (previous / checkpoint.MARKER).is_file()


def test_non_finite_loss_stops_naming_the_step_and_files(tiny_cfg, tmp_path):
    # Offset noise of 1e39 overflows float32: every loss is inf/NaN from the first step.
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step 1, epoch 0; the batch's samples: .*\.png"):
        train(tiny_cfg("train.noise_offset=1e39"), tmp_path / "stop")


def test_non_finite_skip_mode_counts_skips_and_gives_up_after_an_epoch_of_them(tiny_cfg, tmp_path):
    with pytest.raises(FloatingPointError, match="every batch of an epoch"):
        train(tiny_cfg("train.noise_offset=1e39", "train.nonfinite=skip"), tmp_path / "skip")


def test_secrets_never_reach_the_run_dir(tmp_path):
    secret = "dummy-secret-7f3a9c"
    env = {**os.environ, "WANDB_API_KEY": secret, "HF_TOKEN": secret, "HUGGING_FACE_HUB_TOKEN": secret,
           "GHIBLI_LAB_CACHE": str(tmp_path / "cache")}
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ghibli_lab.train", *ARGS, "logger=wandb", "logger.mode=offline", "train.max_steps=2",
         f"hydra.run.dir={run}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((run / "wandb").glob("offline-run-*"))
    leaks = [p for p in run.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaks, f"secret written to {leaks}"
    assert secret not in proc.stdout + proc.stderr


def test_no_unsafe_deserialisation_in_the_package():
    """Weights load from safetensors; any torch.load is weights_only; no remote code."""
    for path in (ROOT / "ghibli_lab").glob("*.py"):
        source = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", source):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert "trust_remote_code=True" not in source, path.name
        assert "pickle.load" not in source, path.name
