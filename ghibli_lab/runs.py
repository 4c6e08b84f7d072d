"""Run dirs on disk: finding runs, reading a run's config, ``outputs/latest``, checkpoint lookup.

Pure paths and YAML: no torch, so entry points can use it before the heavy libraries load.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

CONFIG_FILE = Path(".hydra") / "config.yaml"
CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"  # written last into a checkpoint dir: without it the dir is never resumed from


def is_run(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def holds_runs(path: Path) -> bool:
    """A run dir, or a dir with run dirs in it (a sweep)."""
    path = Path(path)
    return is_run(path) or (path.is_dir() and any(is_run(p) for p in path.iterdir() if p.is_dir()))


def eval_output_dir(run_dir: str) -> str:
    """Where evaluation's Hydra output goes: ``<run_dir>/eval``, or, when ``run_dir`` holds no
    run, a temp dir, so a mistyped run_dir never gets folders made in it (the error follows)."""
    if holds_runs(Path(run_dir)):
        return str(Path(run_dir) / "eval")
    return str(Path(tempfile.gettempdir()) / f"ghibli_lab-evaluate-{os.getpid()}")


# What a run cost, from its summary.json, with the heading evaluation's and the report's tables give it.
COST_COLUMNS = {
    "method": "method",
    "trainable_params": "trainable params",
    "weights_mb": "file size (MB)",
    "peak_memory_mb": "peak memory (MB)",
    "wall_time_s": "wall time (s)",
    "steps_per_s": "steps/s",
}


def run_costs(summary: dict) -> dict[str, Any]:
    """A run's COST_COLUMNS values from its summary.json (None where an older run lacks one)."""
    size = summary.get("weights_bytes")
    values = {**summary, "weights_mb": size / 2**20 if size is not None else None}
    values.setdefault("method", "lora" if summary else None)  # runs from before the method axis
    return {k: values.get(k) for k in COST_COLUMNS}


def load_run_config(run_dir: str | Path) -> DictConfig:
    """The resolved training config Hydra wrote into ``run_dir`` (the one reader of it)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a training run dir (no {CONFIG_FILE})")
    return OmegaConf.load(path)


def find_runs(root: Path) -> list[Path]:
    """``root`` itself if it is a run dir, else the run dirs directly under it (a sweep), in job order."""
    root = Path(root)
    if is_run(root):
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"run_dir={root} does not exist")
    runs = [p for p in root.iterdir() if is_run(p)]
    if not runs:
        raise FileNotFoundError(f"run_dir={root} is neither a run dir nor a sweep dir (no */{CONFIG_FILE})")

    def job_number(p: Path) -> tuple[int, str]:
        head = p.name.split("_")[0]
        return (int(head) if head.isdigit() else 1 << 30, p.name)

    return sorted(runs, key=job_number)


def update_latest(output_root: str | Path, target: Path) -> None:
    """Point ``<output_root>/latest`` at ``target`` (atomically: symlink to a temp name, rename)."""
    link = Path(output_root) / "latest"
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".latest.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(Path(target).resolve(), link.parent.resolve()))
    os.replace(tmp, link)


def process_shard() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's once it is initialised, else the
    launcher's ``RANK`` / ``WORLD_SIZE`` (torchrun, accelerate launch), else (0, 1)."""
    torch = sys.modules.get("torch")  # never imported here just to ask
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def latest_checkpoint(run_dir: Path) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint under ``run_dir/checkpoints`` and the incomplete ones."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None, []
    complete, partial = [], []
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        (complete if path.name.startswith("step_") and (path / MARKER).is_file() else partial).append(path)
    return (complete[-1] if complete else None), partial


def find_resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """``auto``: the newest complete checkpoint in ``run_dir`` (None if there is none); a path:
    that checkpoint; null: start fresh. Incomplete checkpoints are reported and never used."""
    if not resume:
        return None
    if resume == "auto":
        path, partial = latest_checkpoint(run_dir)
        for p in partial:
            log.warning("ignoring incomplete checkpoint %s (no %s marker)", p, MARKER)
        if path is None:
            log.info("train.resume=auto: no checkpoint in %s, starting from step 0", run_dir)
        return path
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint dir (no {MARKER} marker)")
    return path


class RunDirBusy(RuntimeError):
    """Another process is writing this run dir."""


class ResumeMismatch(ValueError):
    """The checkpoint was trained with another config than the one resuming it."""


@contextmanager
def run_lock(run_dir: Path, active: bool = True) -> Iterator[None]:
    """Hold ``run_dir/.lock`` (an OS file lock, released even on kill -9) while training; a second
    writer is refused at once. Two writers would prune each other's checkpoints. ``active=False``
    (other ranks of one multi-process run, which share the dir) takes no lock."""
    if not active:
        yield
        return
    path = Path(run_dir) / ".lock"
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirBusy(
            f"run dir {run_dir} is being written by another process (pid {holder}); wait for it to "
            f"finish, or give this run its own dir (hydra.run.dir=...)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


# Keys a resumed run may change: how long it runs, how often it logs, validates, samples and
# checkpoints, and how it reports. Everything else changes what is trained and is refused.
RESUME_SAFE_KEYS = (
    "name", "output_root", "cache_dir", "logger.", "sample.", "scheduler.", "guidance.",
    "train.max_steps", "train.epochs", "train.resume", "train.log_every", "train.val_every",
    "train.sample_every", "train.checkpoint_every", "train.keep_checkpoints", "train.num_workers",
    "train.nonfinite", "train.compile", "train.channels_last", "train.gradient_checkpointing",
)


def flat_config(cfg: Any, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """A resolved config (a dict) flattened to ``a.b.c`` keys, without the keys ``leave_out``
    names (a key, or a prefix ending in ".")."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(cfg, "")
    return {k: v for k, v in flat.items() if not any(k == s or (s.endswith(".") and k.startswith(s)) for s in leave_out)}


def training_config(cfg: Any) -> dict[str, Any]:
    """The keys of a resolved training config (a dict) that change what is trained, flattened."""
    return flat_config(cfg, RESUME_SAFE_KEYS)


# Keys that change how a trained model is sampled, logged or named, never its weights: sweep jobs
# that differ only in these train once (weights_fingerprint).
SAMPLING_ONLY_KEYS = (
    "name", "output_root", "cache_dir", "logger.", "sample.", "scheduler.", "guidance.",
    "train.log_every", "train.sample_every", "train.num_workers",
)
TRAINED_ONCE = ".trained"  # in a sweep dir: <fingerprint>.json per training config, naming the job that trained it


def weights_fingerprint(cfg: DictConfig) -> str:
    """What a run's weights depend on: every config key except SAMPLING_ONLY_KEYS, hashed."""
    flat = flat_config(OmegaConf.to_container(cfg, resolve=True), SAMPLING_ONLY_KEYS)
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:24]


def trained_twin(sweep_dir: Path, fingerprint: str) -> Path | None:
    """The finished job of this sweep that trained these exact weights, if there is one."""
    record = Path(sweep_dir) / TRAINED_ONCE / f"{fingerprint}.json"
    if not record.is_file():
        return None
    run = Path(json.loads(record.read_text())["run"])
    return run if (run / "summary.json").is_file() else None


def record_trained(sweep_dir: Path, fingerprint: str, run_dir: Path) -> None:
    folder = Path(sweep_dir) / TRAINED_ONCE
    folder.mkdir(exist_ok=True)
    tmp = folder / f".{fingerprint}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"run": str(Path(run_dir).resolve())}))
    os.replace(tmp, folder / f"{fingerprint}.json")


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every training-relevant key that differs."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}" for k in keys if saved.get(k) != current.get(k)]
