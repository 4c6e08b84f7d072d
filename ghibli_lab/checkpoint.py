"""Crash-safe training checkpoints that resume exactly.

A checkpoint holds everything the loop needs to continue as if it had never stopped: the
trainable weights (the adapter, or a full fine-tune's UNet), optimizer, lr-scheduler and grad-scaler state, every RNG state (python,
numpy, torch CPU and CUDA), and the loop position (step, epoch, batches consumed in the epoch,
the partial logging window).

Writing: into ``checkpoints/.tmp-step_N-<pid>/``, finished with a ``COMPLETE`` marker, then
renamed to ``checkpoints/step_N`` in one atomic step. Only after that are older checkpoints
pruned (diffusers prunes first, so a crash mid-save leaves no good checkpoint). A directory
without the marker is never resumed from. Free disk space is checked first; when it is short the
save is skipped with an error and the previous checkpoint stays.

Safety: tensors are stored as safetensors; the optimizer/scheduler state, which holds Python
numbers and lists as well, goes through ``torch.save`` and is read back with
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ghibli_lab.runs import CHECKPOINTS, MARKER, latest_checkpoint

log = logging.getLogger(__name__)

BEST_FILE = "best.safetensors"  # early stopping's best weights so far


def save_checkpoint(
    run_dir: Path,
    step: int,
    params: dict[str, torch.nn.Parameter],
    optimizer,
    lr_scheduler,
    scaler,
    loop_state: dict[str, Any],
    keep: int,
    export: Callable[[Path], Any] | None = None,
    best: dict[str, torch.Tensor] | None = None,
) -> Path | None:
    """Write ``checkpoints/step_<step>`` atomically, then prune to the newest ``keep``.
    ``export(dir)``, when given, also writes the weights as a loadable file into the checkpoint;
    ``best``, early stopping's best weights so far, go in as ``best.safetensors``.
    Returns its path, or None when it could not be written (too little free disk space, or a
    write that failed part-way): then nothing older is removed and no partial dir is left."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    need = _estimated_bytes(params, root)
    free = shutil.disk_usage(root).free
    if free < need:
        previous = latest_checkpoint(run_dir)[0]
        log.error(
            "not enough disk space for checkpoint step %d: need about %.1f MiB, %.1f MiB free in %s; "
            "keeping %s",
            step, need / 2**20, free / 2**20, root, previous.name if previous else "no earlier checkpoint",
        )
        return None

    tmp = root / f".tmp-step_{step:06d}-{os.getpid()}"
    try:
        _write(tmp, step, params, optimizer, lr_scheduler, scaler, loop_state, export, best)
    except (OSError, SafetensorError, RuntimeError) as err:  # a disk that fills up mid-save, say
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)[0]
        log.error(
            "checkpoint step %d could not be written (%s); keeping %s",
            step, err, previous.name if previous else "no earlier checkpoint",
        )
        return None
    if final.exists():  # only if a run is re-saving a step it already saved
        shutil.rmtree(final)
    os.rename(tmp, final)
    _prune(root, keep)
    return final


def _write(tmp: Path, step: int, params, optimizer, lr_scheduler, scaler, loop_state: dict[str, Any], export, best) -> None:
    """Every file of a checkpoint into ``tmp``, flushed to disk, the marker last."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if export is not None:
        export(tmp)  # loadable on its own, as at the end of training
    save_file({k: p.detach().float().cpu().contiguous() for k, p in params.items()}, tmp / "trainable.safetensors")
    if best:
        save_file({k: v.contiguous() for k, v in best.items()}, tmp / BEST_FILE)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        },
        tmp / "optim.pt",
    )
    save_file(_torch_rng_states(), tmp / "rng.safetensors")
    state = {**loop_state, "step": step, "python_rng": _python_rng(), "numpy_rng": _numpy_rng()}
    (tmp / "loop_state.json").write_text(json.dumps(state))
    _fsync_dir(tmp)
    (tmp / MARKER).write_text(str(step))


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter], optimizer, lr_scheduler, scaler) -> dict:
    """Restore weights and optimizer/scheduler/scaler state from ``path``; return the loop state.
    RNG states are restored separately with ``restore_rng`` once the data loader is positioned."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    weights = load_file(path / "trainable.safetensors")
    missing = set(params) - set(weights)
    if missing:
        raise ValueError(
            f"checkpoint {path} does not match this run's trainable weights: {len(missing)} parameters missing "
            f"(e.g. {sorted(missing)[0]}); was it written with other lora.* or method.* settings?"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name].to(param.device, param.dtype))
    state = torch.load(path / "optim.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    loop_state = json.loads((path / "loop_state.json").read_text())
    loop_state["torch_rng"] = load_file(path / "rng.safetensors")
    return loop_state


def load_best(path: Path) -> dict[str, torch.Tensor]:
    """Early stopping's best weights as the checkpoint at ``path`` kept them ({} if none)."""
    best = Path(path) / BEST_FILE
    return load_file(best) if best.is_file() else {}


def restore_rng(loop_state: dict) -> None:
    """Put every RNG back where it was when the checkpoint was written."""
    version, internal, gauss = loop_state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = loop_state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    states = loop_state["torch_rng"]
    torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in states:
                torch.cuda.set_rng_state(states[f"cuda{i}"], i)


def _torch_rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            states[f"cuda{i}"] = torch.cuda.get_rng_state(i)
    return states


def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _estimated_bytes(params: dict[str, torch.nn.Parameter], root: Path) -> int:
    """The size of the last checkpoint if there is one, else 5x the fp32 LoRA weights (weights,
    Adam's two moments, two LoRA files), plus a margin."""
    previous = latest_checkpoint(root.parent)[0]
    if previous is not None:
        size = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file())
    else:
        size = 5 * 4 * sum(p.numel() for p in params.values())
    return int(size * 1.2) + (16 << 20)


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and leftovers of crashed saves."""
    complete = sorted(p for p in root.glob("step_*") if (p / MARKER).is_file())
    for old in complete[: max(len(complete) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".tmp-step_*"):
        log.warning("removing the incomplete checkpoint %s (left by an interrupted save)", leftover.name)
        shutil.rmtree(leftover, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Flush the files' data before the marker is written, so the marker never outlives them."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
