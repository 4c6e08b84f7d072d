"""Experiment tracking: W&B plus a local ``metrics.jsonl``, behind one small interface.

W&B has no offline read API, so every logged step also goes to ``metrics.jsonl`` in the run
dir (one JSON object per step with the same slash-separated keys). Only the main process
tracks. ``finish`` must always be called: Hydra runs multirun jobs in one process and a second
``wandb.init`` without ``finish`` silently returns the previous job's run.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

WANDB_HOST = "https://api.wandb.ai"


def wandb_mode(logger_cfg: DictConfig) -> str:
    """``disabled`` for logger=none; else the configured mode, ``WANDB_MODE``, or online when an
    API key is configured and offline otherwise (wandb.init refuses to start with no key)."""
    if logger_cfg.name == "none":
        return "disabled"
    if logger_cfg.mode:
        return logger_cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_key_configured() else "offline"


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:  # `wandb login` stores the key in ~/.netrc (or $NETRC)
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return bool(read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", WANDB_HOST)))
    except Exception:  # a private API of wandb; if it moves, offline is the safe answer
        return False


class Tracker:
    """Logs scalars and images to W&B and ``metrics.jsonl``; a no-op when ``active`` is False."""

    def __init__(
        self,
        run_dir: Path,
        logger_cfg: DictConfig,
        config: dict[str, Any],
        group: str | None,
        name: str,
        active: bool = True,
        resume_id: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.active = active
        self.run = None
        self.mode = wandb_mode(logger_cfg)
        if not active:
            return
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        if self.mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=logger_cfg.project,
                entity=logger_cfg.entity,
                mode=self.mode,
                dir=str(self.run_dir),
                config=config,
                group=group,
                name=name,
                job_type="train",
                reinit="finish_previous",
                id=resume_id,  # a resumed training run continues its own W&B run
                resume="allow" if resume_id else None,
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def identity(self) -> dict[str, Any]:
        """What is needed to reopen this W&B run later (its id, project and mode)."""
        run = self.run
        return {
            "id": run.id if run is not None else None,
            "project": run.project if run is not None else None,
            "entity": run.entity if run is not None and self.mode == "online" else None,
            "mode": self.mode,
        }

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        if not self.active:
            return
        self._jsonl.close()
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
        self.active = False


@contextmanager
def tracking(
    run_dir: Path, cfg: DictConfig, group: str | None, name: str | None, active: bool, resume_id: str | None = None
) -> Iterator[Tracker]:
    """A Tracker for a training run, always finished: with exit code 1 if the block raises."""
    tracker = Tracker(
        run_dir,
        cfg.logger,
        config=OmegaConf.to_container(cfg, resolve=True),
        group=group,
        name=name or Path(run_dir).name,
        active=active,
        resume_id=resume_id,
    )
    try:
        yield tracker
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop the rows a resumed run will write again (logged after its checkpoint)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    """JSON-safe scalar: tensors become floats, NaN/inf become strings so the file stays valid."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
