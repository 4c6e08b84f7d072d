"""Publish a finished run to the Hugging Face Hub:

    python -m ghibli_lab.publish run_dir=<run dir> repo_id=<user>/<name> [dry_run=true] [private=false]

(Re)writes the run's model card (``README.md``, ``card.py``) and uploads, in one commit to a model
repo (created private unless ``private=false``), the card, the weights dir (``lora/``, ``full/``
or ``embeddings/``), ``samples/final.png``, ``summary.json``, ``eval/metrics.json`` when the run
was evaluated, and the run's ``.hydra/config.yaml`` as ``training_config.yaml``. Never
checkpoints, W&B files or the rest of ``.hydra/``: they are resume state and local detail.

``dry_run=true`` writes ``<run_dir>/publish_dry_run.json`` (every file with its path in the
repo, size and sha256) and uploads nothing: no token, no network. The token is ``token=`` or
huggingface_hub's own (``HF_TOKEN``, or the one ``hf auth login`` saved); it is never written
anywhere (this entry point writes no ``.hydra/``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from ghibli_lab.card import CARD_FILE, METRICS_FILE, SAMPLES_FILE, write_model_card, write_text_atomic
from ghibli_lab.config import CONF_DIR
from ghibli_lab.hub import HUB_URL, OfflineError, hub_reachable, offline_mode
from ghibli_lab.methods import weights_dir
from ghibli_lab.runs import CONFIG_FILE, holds_runs, is_run, load_run_config

log = logging.getLogger(__name__)

DRY_RUN_FILE = "publish_dry_run.json"
TRAINING_CONFIG = "training_config.yaml"  # .hydra/config.yaml's name in the repo


@dataclass
class PublishConfig:
    """Schema of ``conf/publish.yaml`` (values live there)."""

    run_dir: str = MISSING  # a finished training run dir
    repo_id: str = MISSING  # <user or org>/<name> on the hub
    dry_run: bool = MISSING  # list what would be uploaded (publish_dry_run.json); upload nothing
    private: bool = MISSING  # for a repo this creates; an existing repo keeps its visibility
    token: Optional[str] = MISSING  # null: huggingface_hub's (HF_TOKEN, or the saved login)


class PublishError(ValueError):
    """Bad input or a missing token: reported as one message, no traceback."""


def log_dir(*, _root_: DictConfig) -> str:
    """Where Hydra's output (publish.log) goes: the run dir, or, when ``run_dir`` is no run (or
    not given), a temp dir, so a mistyped run_dir never gets a folder made for it (the error
    follows). It reads the config's root because a plain ``${run_dir}`` argument fails inside
    Hydra, with a traceback, before ``main`` can say which key is missing."""
    run_dir = None if OmegaConf.is_missing(_root_, "run_dir") else _root_.run_dir
    if run_dir is not None and is_run(Path(run_dir)):
        return str(run_dir)
    return str(Path(tempfile.gettempdir()) / f"ghibli_lab-publish-{os.getpid()}")


ConfigStore.instance().store(name="publish_schema", node=PublishConfig)
if not OmegaConf.has_resolver("publish_output"):
    OmegaConf.register_new_resolver("publish_output", log_dir)


def publish(cfg: DictConfig) -> dict:
    """Write the model card and upload the run (or, with ``cfg.dry_run``, write the list of what
    would be uploaded). Returns ``{"repo_id", "private", "files", "dry_run"}`` plus ``"plan"``
    (dry run: the JSON file) or ``"url"`` and ``"commit"`` (the upload). Bad input, a missing
    token and offline mode raise ``PublishError`` / ``OfflineError`` before anything is written."""
    run_dir = Path(cfg.run_dir)
    check_finished(run_dir)
    check_repo_id(cfg.repo_id)
    token = None
    if not cfg.dry_run:
        token = hub_token(cfg.token)
        check_online(cfg.repo_id)
    write_model_card(run_dir, repo_id=cfg.repo_id)
    files = [file_entry(path_in_repo, local) for path_in_repo, local in upload_files(run_dir)]
    plan = {"repo_id": cfg.repo_id, "private": bool(cfg.private), "files": files}
    total = sum(f["bytes"] for f in files)
    log.info("%d files, %.2f MB, for %s (%s)", len(files), total / 2**20, cfg.repo_id, "private" if cfg.private else "public")
    if cfg.dry_run:
        path = run_dir / DRY_RUN_FILE
        write_text_atomic(path, json.dumps(plan, indent=2) + "\n")
        return {**plan, "dry_run": True, "plan": path}
    return {**plan, "dry_run": False, **upload(cfg.repo_id, files, bool(cfg.private), token)}


def check_finished(run_dir: Path) -> None:
    """A run dir whose training finished: its config, its weights and its summary.json."""
    if not run_dir.exists():
        raise PublishError(f"run_dir={run_dir} does not exist")
    if not is_run(run_dir):
        if holds_runs(run_dir):
            raise PublishError(f"run_dir={run_dir} is a sweep dir: publish one run at a time, run_dir={run_dir}/<run>")
        raise PublishError(f"run_dir={run_dir} is not a training run dir (no {CONFIG_FILE})")
    weights = weights_dir(run_dir, load_run_config(run_dir))
    missing = [name for name, there in ((f"{weights.name}/", weights.is_dir()), ("summary.json", (run_dir / "summary.json").is_file())) if not there]
    if missing:
        raise PublishError(
            f"run_dir={run_dir} has not finished training (no {' and no '.join(missing)}): publish a finished run, "
            "or finish it with the same command and train.resume=auto"
        )


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PublishError(f"repo_id={repo_id!r} is not a valid hub repo id (<user or org>/<name>): {err}") from None


def hub_token(token: Optional[str]) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token: run `hf auth login` (older huggingface_hub: `huggingface-cli login`) or set "
            "HF_TOKEN, or pass token=...; or pass dry_run=true to see what would be uploaded"
        )
    return token


def check_online(repo_id: str) -> None:
    """Fail in about a second, before the card is written or a request is made, when the hub
    can't be reached (offline mode, or no connection to HF_ENDPOINT)."""
    if offline_mode():
        raise OfflineError(
            f"HF_HUB_OFFLINE=1 (offline mode): nothing can be uploaded to {repo_id}. Unset HF_HUB_OFFLINE to "
            "publish, or pass dry_run=true to see what would be uploaded"
        )
    if not hub_reachable():
        endpoint = os.environ.get("HF_ENDPOINT", HUB_URL)
        raise OfflineError(
            f"the hub ({endpoint}) can't be reached (offline?): nothing uploaded to {repo_id}. "
            "Pass dry_run=true to see what would be uploaded"
        )


def upload_files(run_dir: Path) -> list[tuple[str, Path]]:
    """(path in the repo, local file) for everything published, sorted by path in the repo."""
    cfg = load_run_config(run_dir)
    files = [(CARD_FILE, run_dir / CARD_FILE), (TRAINING_CONFIG, run_dir / CONFIG_FILE), ("summary.json", run_dir / "summary.json")]
    weights = weights_dir(run_dir, cfg)
    for path in sorted(p for p in weights.rglob("*") if p.is_file()):
        if path.name.startswith("."):  # temp files of an interrupted write, never part of the weights
            continue
        files.append((path.relative_to(run_dir).as_posix(), path))
    files += [(rel.as_posix(), run_dir / rel) for rel in (SAMPLES_FILE, METRICS_FILE) if (run_dir / rel).is_file()]
    return sorted(files)


def file_entry(path_in_repo: str, local: Path) -> dict:
    digest = hashlib.sha256()
    with open(local, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"path_in_repo": path_in_repo, "local_path": str(local.resolve()), "bytes": local.stat().st_size, "sha256": digest.hexdigest()}


def upload(repo_id: str, files: list[dict], private: bool, token: str) -> dict:
    """Create the model repo if needed and add every file in one commit (a failure part-way
    leaves the repo as it was)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    # exist_ok keeps an existing repo's visibility: never put a run meant to be private into a public repo.
    if private and not api.repo_info(repo_id, repo_type="model", token=token).private:
        raise PublishError(
            f"{repo_id} exists and is public, and private=true: make it private on the hub, or pass private=false to publish into it"
        )
    operations = [CommitOperationAdd(path_in_repo=f["path_in_repo"], path_or_fileobj=f["local_path"]) for f in files]
    commit = api.create_commit(
        repo_id, operations=operations, commit_message="Upload run from ghibli_lab", repo_type="model", token=token
    )
    return {"url": str(url), "commit": commit.commit_url}


@hydra.main(config_path=CONF_DIR, config_name="publish", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        missing = [key for key in ("run_dir", "repo_id") if OmegaConf.is_missing(cfg, key)]
        if missing:
            raise PublishError(f"give {' and '.join(missing)}: run_dir=<run dir> repo_id=<user or org>/<name> [dry_run=true]")
        result = publish(cfg)
    except (PublishError, OfflineError) as err:  # expected failures: the message, not a stack trace
        output = HydraConfig.get().runtime.output_dir
        if Path(output).name == f"ghibli_lab-publish-{os.getpid()}":  # log_dir's temp dir: leave nothing
            shutil.rmtree(output, ignore_errors=True)
        raise SystemExit(f"ghibli_lab.publish: {err}") from None
    except HfHubHTTPError as err:  # a bad token, no write access, a name taken...: the hub's own words
        raise SystemExit(f"ghibli_lab.publish: the hub refused the upload to {cfg.repo_id}: {err}") from None
    files = result["files"]
    for f in files:
        print(f"  {f['path_in_repo']}  ({f['bytes']:,} bytes)")
    total = sum(f["bytes"] for f in files)
    visibility = "private" if result["private"] else "public"
    if result["dry_run"]:
        print(f"dry run: {len(files)} files, {total:,} bytes would go to {cfg.repo_id} ({visibility}); nothing uploaded")
        print(f"list: {result['plan']}")
    else:
        print(f"published {len(files)} files, {total:,} bytes to {result['url']} ({visibility})")
        print(f"commit: {result['commit']}")


if __name__ == "__main__":
    main()
