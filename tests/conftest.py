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
