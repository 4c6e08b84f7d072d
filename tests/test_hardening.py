"""Hostile conditions: a changed config on resume, a torn metrics file, a disk that fills up, two
writers of one run dir, files deleted after training, a mistyped run_dir, unfinished sweep runs,
failed commands and two evaluations sharing one cache."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image
from safetensors import SafetensorError

from ghibli_lab import checkpoint, loop
from ghibli_lab.evaluate import evaluate
from ghibli_lab.loop import PREEMPTED_EXIT
from ghibli_lab.runs import ResumeMismatch, RunDirBusy
from ghibli_lab.train import train

from .conftest import compose_train

ARGS = [
    "experiment=demo", "logger=none", "train.batch_size=2", "train.val_every=2", "train.log_every=1",
    "dataset.num_images=12", "scheduler.steps=2", "sample.seeds=[0]", "sample.prompts=[a hill]",
]


def cfg(tmp_path: Path, *overrides: str):
    return compose_train([*ARGS, f"cache_dir={tmp_path / 'cache'}", *overrides])


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A 4-step run with a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("resume")
    train(cfg(root, "train.max_steps=4", "train.checkpoint_every=2"), root / "run")
    return root


def copy_run(checkpointed: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(checkpointed / "run", run)
    return run


def test_resume_refuses_a_changed_training_config_and_names_the_keys(checkpointed, tmp_path):
    run = copy_run(checkpointed, tmp_path)
    with pytest.raises(ResumeMismatch, match=r"lora\.alpha: 8\.0 -> 32\.0.*train\.lr: 0\.001 -> 1e-05"):
        train(cfg(checkpointed, "train.max_steps=4", "train.resume=auto", "lora.alpha=32", "train.lr=1e-5"), run)
    with pytest.raises(ResumeMismatch, match=r"lora\.rank: 8 -> 16"):
        train(cfg(checkpointed, "train.max_steps=4", "train.resume=auto", "lora.rank=16"), run)
    # Running longer (and logging differently) is safe: it continues.
    summary = train(cfg(checkpointed, "train.max_steps=6", "train.resume=auto", "train.log_every=2"), run)
    assert summary["steps"] == 6 and summary["resumed_from"].endswith("step_000002")


def test_a_torn_last_line_of_metrics_does_not_block_resume(checkpointed, tmp_path):
    run = copy_run(checkpointed, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/lo')  # what a kill mid-write leaves
    summary = train(cfg(checkpointed, "train.max_steps=4", "train.resume=auto"), run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 4 and [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]


def test_a_save_that_fails_part_way_keeps_the_previous_checkpoint(checkpointed, tmp_path, monkeypatch, caplog):
    run = copy_run(checkpointed, tmp_path)
    real_save = checkpoint.save_file

    def disk_full(tensors, path, *args, **kwargs):
        if Path(path).name == "trainable.safetensors":
            raise SafetensorError("Error while serializing: No space left on device (os error 28)")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with caplog.at_level(logging.ERROR):
        summary = train(cfg(checkpointed, "train.max_steps=6", "train.checkpoint_every=1", "train.resume=auto"), run)
    assert summary["steps"] == 6  # training went on
    assert "could not be written" in caplog.text and "No space left" in caplog.text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]  # no partial dirs


def test_a_stop_signal_with_no_room_for_a_checkpoint_says_so(checkpointed, tmp_path, monkeypatch, caplog):
    run = copy_run(checkpointed, tmp_path)
    monkeypatch.setattr(checkpoint, "_estimated_bytes", lambda params, root: 1 << 60)  # a full disk

    @contextmanager
    def signalled():
        yield {"signal": signal.SIGTERM, "previous": {}}

    monkeypatch.setattr(loop, "preemption", signalled)
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as stop:
        train(cfg(checkpointed, "train.max_steps=6", "train.resume=auto"), run)
    assert stop.value.code == PREEMPTED_EXIT
    assert "NO checkpoint could be written" in caplog.text and "continue from step_000002" in caplog.text
    assert "checkpoint written" not in caplog.text


def test_a_second_writer_of_a_run_dir_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "f.write('4242'); f.flush(); print('locked', flush=True); time.sleep(60)", str(run / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=r"being written by another process \(pid 4242\)"):
            train(cfg(tmp_path, "train.max_steps=2"), run)
        assert not (run / "metrics.jsonl").exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert train(cfg(tmp_path, "train.max_steps=2"), run)["steps"] == 2  # free again once it is gone


def folder_dataset(path: Path, n: int = 12) -> Path:
    path.mkdir()
    for i in range(n):
        Image.new("RGB", (64, 64), (8 * i, 100, 240 - 8 * i)).save(path / f"{i:02d}.png")
        (path / f"{i:02d}.txt").write_text(f"picture {i}")
    return path


def test_deleting_a_held_out_file_does_not_move_a_training_image_into_the_held_out_set(tmp_path, caplog):
    data = folder_dataset(tmp_path / "data", n=30)
    run = tmp_path / "run"
    train_cfg = cfg(tmp_path, "dataset=folder", f"dataset.path={data}", "dataset.resolution=64", "dataset.num_images=null", "train.max_steps=2")
    train(train_cfg, run)
    (run / ".hydra").mkdir()
    OmegaConf.save(train_cfg, run / ".hydra" / "config.yaml")
    split = json.loads((run / "split.json").read_text())
    trained = {name for _, name in split["train"]}
    held = [name for _, name in split["holdout"]]
    assert len(held) == 3
    Path(held[0]).unlink()
    Path(held[0]).with_suffix(".txt").unlink()
    with caplog.at_level(logging.WARNING):
        (result,) = evaluate(compose_train([f"run_dir={run}", "eval.features=tiny", "eval.steps=1"], config_name="evaluate"))
    assert result["protocol"]["n_real"] == 2  # the other held-out images only; no training image came in
    assert "1 holdout images recorded in" in caplog.text and "missing now" in caplog.text
    assert not set(held) & trained


def run_cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GHIBLI_LAB_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_evaluate_with_a_mistyped_run_dir_creates_nothing(tmp_path):
    proc = run_cli("ghibli_lab.evaluate", f"run_dir={tmp_path / 'no' / 'such'}", cwd=tmp_path)
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "no").exists()


def test_a_failed_command_does_not_move_outputs_latest(tmp_path):
    proc = run_cli("ghibli_lab.train", "experiment=demo", "model.pretrained=nobody/no-such-model", cwd=tmp_path)
    assert proc.returncode != 0 and "nobody/no-such-model" in proc.stderr
    assert not (tmp_path / "outputs" / "latest").exists()


@pytest.fixture(scope="module")
def sweep_with_an_unfinished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("partial") / "sweep"
    for i, alpha in enumerate([4, 8]):
        run_cfg = cfg(root.parent, "train.max_steps=2", "dataset.num_images=20", f"lora.alpha={alpha}")
        run = root / f"{i}_lora.alpha-{alpha}"
        train(run_cfg, run)
        (run / ".hydra").mkdir()
        OmegaConf.save(run_cfg, run / ".hydra" / "config.yaml")
    unfinished = root / "2_lora.alpha-16"
    (unfinished / ".hydra").mkdir(parents=True)
    OmegaConf.save(run_cfg, unfinished / ".hydra" / "config.yaml")
    return root


def test_a_sweep_with_an_unfinished_run_is_evaluated_where_it_finished(sweep_with_an_unfinished_run):
    root = sweep_with_an_unfinished_run
    results = evaluate(compose_train([f"run_dir={root}", "eval.features=tiny", "eval.steps=1"], config_name="evaluate"))
    assert [r["run"].name for r in results] == ["0_lora.alpha-4", "1_lora.alpha-8"]
    assert "Not evaluated (no trained weights: training did not finish): 2_lora.alpha-16" in (root / "eval_table.md").read_text()


def test_two_evaluations_sharing_the_base_image_cache_both_succeed(sweep_with_an_unfinished_run, tmp_path):
    """Real concurrent processes: base images are written to a temp dir and renamed, never read
    half-written (before: 'image file is truncated' in 2 of 4 trials)."""
    # One thread each: two processes spinning two OpenMP threads each on two cores crawl.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cache = tmp_path / "shared"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ghibli_lab.evaluate", f"run_dir={sweep_with_an_unfinished_run / run}",
             "eval.features=tiny", "eval.steps=2", "eval.images_per_prompt=3", f"cache_dir={cache}"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for run in ("0_lora.alpha-4", "1_lora.alpha-8")
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    (entry,) = list((cache / "eval_base").iterdir())  # one complete set, no temp dirs left
    assert (entry / "done").is_file() and len(list(entry.glob("*.png"))) == 3 * 2
    metrics = [json.loads((sweep_with_an_unfinished_run / run / "eval" / "metrics.json").read_text())
               for run in ("0_lora.alpha-4", "1_lora.alpha-8")]
    assert metrics[0]["base"] == metrics[1]["base"]


# -- dataset boundaries ---------------------------------------------------------------------------


def test_symlink_loops_end_and_links_outside_the_dataset_are_not_read(tmp_path, caplog):
    from ghibli_lab.data import find_images, load_records

    data = folder_dataset(tmp_path / "data", n=4)
    (data / "sub").mkdir()
    Image.new("RGB", (64, 64), "red").save(data / "sub" / "inner.png")
    (data / "sub" / "loop").symlink_to(data)  # a link back up: os.walk with followlinks never ends
    secret = tmp_path / "outside"
    secret.mkdir()
    Image.new("RGB", (64, 64), "blue").save(secret / "private.png")
    (secret / "notes.txt").write_text("not a caption of this dataset")
    (data / "linked.png").symlink_to(secret / "private.png")
    (data / "linked_dir").symlink_to(secret)
    (data / "00.txt").unlink()
    (data / "00.txt").symlink_to(secret / "notes.txt")  # a caption link to a file outside
    with caplog.at_level(logging.WARNING):
        found = find_images(data)
    assert [p.relative_to(data).as_posix() for p in found] == ["00.png", "01.png", "02.png", "03.png", "sub/inner.png"]
    assert "point outside the dataset folder" in caplog.text
    ds = OmegaConf.create({"name": "t", "source": "folder", "path": str(data), "image_column": "image",
                           "caption_column": "text", "num_images": None, "style": None, "resolution": 64, "center_crop": True,
                           "random_flip": False, "caption_prefix": "", "default_caption": "a picture", "holdout_fraction": 0.1})
    captions = {Path(r.name).name: r.caption for r in load_records(ds, tmp_path / "cache")}
    assert captions["00.png"] == "a picture"  # the default, not the outside file's text


def test_a_row_pointing_at_a_file_outside_the_dataset_is_not_read(tmp_path, caplog):
    """A folder of parquet files whose image column holds paths (no bytes): a path outside the
    dataset folder is any file on the machine, and is not read."""
    pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from ghibli_lab.data import load_records

    local = tmp_path / "parquet_set"
    (local / "imgs").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (60 * i, 0, 0)).save(local / "imgs" / f"{i}.png")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (64, 64), "green").save(secret)
    paths = [str(local / "imgs" / "0.png"), str(local / "imgs" / "1.png"), str(secret)]
    table = pa.table({"image": [{"bytes": None, "path": p} for p in paths], "text": ["a", "b", "c"]})
    pq.write_table(table, local / "train.parquet")
    ds = OmegaConf.create({"name": "t", "source": "hub", "path": str(local), "image_column": "image",
                           "caption_column": "text", "num_images": None, "resolution": 64, "center_crop": True,
                           "random_flip": False, "caption_prefix": "", "default_caption": "", "holdout_fraction": 0.1})
    with caplog.at_level(logging.WARNING):
        records = load_records(ds, tmp_path / "cache")
    assert [r.caption for r in records] == ["a", "b"]
    assert "outside the dataset" in caplog.text


def test_preflight_decodes_within_a_pixel_budget(tmp_path, monkeypatch):
    from ghibli_lab import data

    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (100, 100), (i * 30, 0, 0)).save(paths[-1])
    records = [data.Record(str(i), str(p), "x", path=str(p)) for i, p in enumerate(paths)]
    monkeypatch.setattr(data, "DECODE_PIXEL_BUDGET", 25_000)  # room for two 100x100 images at a time
    in_flight, peak = [0], [0]
    real_decode = data._decode
    import threading

    lock = threading.Lock()

    def tracked(record):
        with lock:
            in_flight[0] += 10_000
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.05)
        try:
            return real_decode(record)
        finally:
            with lock:
                in_flight[0] -= 10_000

    monkeypatch.setattr(data, "_decode", tracked)
    usable, _ = data.preflight(records, 64)
    assert len(usable) == 6 and peak[0] <= 20_000


def test_a_huge_caption_is_measured_quickly(tmp_path):
    from ghibli_lab.data import Record, caption_length_report
    from ghibli_lab.pipeline import tiny_tokenizer

    start = time.time()
    report = caption_length_report([Record("k", "a.png", "x" * 5_000_000, path="a.png")], tiny_tokenizer())
    assert time.time() - start < 5 and report["too_long"] == 1 and report["max_tokens"] > 77


def test_tiff_is_read_and_gif_is_reported(tmp_path, caplog):
    from ghibli_lab.data import find_images

    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.tif")
    Image.new("RGB", (64, 64), "red").convert("P").save(tmp_path / "b.gif")
    with caplog.at_level(logging.WARNING):
        found = find_images(tmp_path)
    assert [p.name for p in found] == ["a.tif"]
    assert "b.gif" in caplog.text
