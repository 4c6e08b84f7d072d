"""Shared test set-up: offline hub, W&B offline, and composing the real configs."""

from __future__ import annotations

import os
from pathlib import Path

# Without these a stray hub id hangs ~48 s before failing; with them it fails in ~1 s.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("WANDB_API_KEY", None)

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from ghibli_lab.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and when another torch process shares the two
    cores, spinning OpenMP threads make a 0.1 s generation take ~10 s. Restored afterwards.
    (Subprocess tests start fresh interpreters with torch's default.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_train(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """The real ``conf/train.yaml`` composed with ``overrides``, as the CLI would."""
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides or [])


def group_option(schema, group: str, option: str, **overrides) -> DictConfig:
    """``conf/<group>/<option>.yaml`` checked against its schema, with ``overrides``: one config
    group's node as the trainer receives it (the schemas hold no defaults; the YAML does)."""
    return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), overrides)


@pytest.fixture
def tiny_cfg(tmp_path):
    """Factory: the demo experiment shrunk for tests (W&B off unless asked), plus overrides."""

    def make(*overrides: str) -> DictConfig:
        return compose_train(
            [
                "experiment=demo",
                "logger=none",
                "train.max_steps=4",
                "train.batch_size=2",
                "train.val_every=2",
                "train.checkpoint_every=0",
                "train.log_every=1",
                "dataset.num_images=12",
                "scheduler.steps=2",
                "sample.seeds=[0]",
                "sample.prompts=[a hill]",
                f"cache_dir={tmp_path / 'cache'}",
                *overrides,
            ]
        )

    return make


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped cleanly where no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def wandb_offline_runs(wandb_dir: Path) -> list[dict]:
    """Every offline run under ``wandb_dir`` as ``wandb sync`` reads it: the records of its
    ``run-<id>.wandb`` file (a LevelDB-style log of W&B's protobuf records after a 7-byte
    header). Per run: id, group, job_type, name, config keys, summary keys, history steps, dir."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for path in sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", path
        pos, block, chunks, pending = 7, 32768, [], b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind == 0:
                break
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                chunks.append(pending)
        info = {"dir": path.parent, "config": set(), "summary": set(), "steps": []}
        for chunk in chunks:
            record = pb.Record.FromString(chunk)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                info.update(id=r.run_id, group=r.run_group, job_type=r.job_type, name=r.display_name)
                info["config"] |= {item.key for item in r.config.update}
            elif kind == "config":
                info["config"] |= {item.key for item in record.config.update}
            elif kind == "summary":
                info["summary"] |= {item.key or "/".join(item.nested_key) for item in record.summary.update}
            elif kind == "history":
                info["steps"] += [int(item.value_json) for item in record.history.item if item.key == "_step"]
        runs.append(info)
    return runs
