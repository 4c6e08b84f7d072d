"""Run dirs on disk: finding runs, reading a run's config, ``outputs/latest``, checkpoint lookup.

Pure paths and YAML: no torch, so entry points can use it before the heavy libraries load.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

CONFIG_FILE = Path(".hydra") / "config.yaml"
CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"  # written last into a checkpoint dir: without it the dir is never resumed from


def is_run(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


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
