"""Experiment tracking: W&B plus a local ``metrics.jsonl``, behind one small interface.

W&B has no offline read API, so every logged step also goes to ``metrics.jsonl`` in the run
dir (one JSON object per step with the same slash-separated keys). Only the main process
tracks. ``finish`` must always be called: Hydra runs multirun jobs in one process and a second
``wandb.init`` without ``finish`` silently returns the previous job's run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

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
            "group": run.group if run is not None else None,
            "name": run.name if run is not None else None,
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
    name = name or Path(run_dir).name
    tracker = Tracker(
        run_dir,
        cfg.logger,
        config=OmegaConf.to_container(cfg, resolve=True),
        group=group or name,  # a single run is its own group: its evaluations and reports join it
        name=name,
        active=active,
        resume_id=resume_id,
    )
    try:
        yield tracker
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()


def log_side_run(run_dir: Path, job_type: str, summary: dict[str, Any], config: dict[str, Any], images: dict[str, Path] | None = None) -> bool:
    """Log an evaluation or a report of a training run as a W&B run of its own: ``job_type``
    "eval" or "report", in the training run's group, with ``train_run_id`` in its config.

    The training run is never reopened: reopening it offline wrote a second and third offline dir
    with the same run id whose ``_step`` restarted at 0, and a later ``wandb sync`` of those could
    replace the training history. Returns False when the training run had no W&B run."""
    summary_path = Path(run_dir) / "summary.json"
    ident = (json.loads(summary_path.read_text()).get("wandb") or {}) if summary_path.is_file() else {}
    if not ident.get("id") or ident.get("mode") == "disabled":
        return False
    import wandb

    # A run recorded online but followed up without an API key goes offline (wandb.init would refuse).
    mode = ident["mode"] if ident["mode"] != "online" else wandb_mode(OmegaConf.create({"name": "wandb", "mode": None}))
    name = ident.get("name") or Path(run_dir).name
    wb = wandb.init(
        project=ident.get("project"),
        entity=ident.get("entity"),
        mode=mode,
        dir=str(run_dir),
        group=ident.get("group") or name,
        job_type=job_type,
        name=f"{name} {job_type}",
        config={"train_run_id": ident["id"], **config},
        reinit="finish_previous",
        settings=wandb.Settings(quiet=True),
    )
    try:
        wb.summary.update(summary)
        if images:
            wb.log({f"{job_type}/{k}": wandb.Image(str(p)) for k, p in images.items()})
    except BaseException:
        wb.finish(exit_code=1)
        raise
    wb.finish()
    return True


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop the rows a resumed run will write again (logged after its checkpoint), and a torn
    line a killed process left half-written."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            log.warning("%s: dropping an unreadable line (torn by an interrupted write): %.80s", path, line)
            continue
        if row is not None and row.get("step", after_step + 1) <= after_step:
            rows.append(line)
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
