"""The Hydra configs in conf/ and the checks in ghibli_lab.config."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from .conftest import CONF_DIR, compose_train
from ghibli_lab.config import check_config

# Our groups; conf/hydra/ holds Hydra's own (launcher presets), tested in test_distributed.py.
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("experiment", "hydra"))
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]
EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))


def test_groups_and_experiments_are_found():
    """The parametrised tests below really cover the config tree (a moved conf/ would skip them)."""
    assert {"model", "dataset", "lora", "scheduler", "guidance", "logger"} <= set(GROUPS)
    assert {"demo", "ghibli100_sdxl"} <= set(EXPERIMENTS)
    assert all(len(list((CONF_DIR / group).glob("*.yaml"))) >= 2 for group in GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_with_its_values(group, option):
    """`group=option` on the command line composes and selects exactly that file's values."""
    cfg = compose_train([f"{group}={option}"])
    raw = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    # ``???`` (must be given on the command line) is checked separately, by check_config.
    expected = {k: v for k, v in OmegaConf.to_container(raw, resolve=False).items() if v != "???"}
    composed = OmegaConf.to_container(cfg[group], resolve=False)
    assert {k: composed[k] for k in expected} == expected


def test_folder_dataset_requires_a_path():
    """dataset=folder without dataset.path is refused, naming dataset.path; with one it passes."""
    with pytest.raises(ValueError, match="dataset.path"):
        check_config(compose_train(["dataset=folder"]))
    cfg = compose_train(["dataset=folder", "dataset.path=/data/pictures"])
    check_config(cfg)
    assert cfg.dataset.path == "/data/pictures"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_passes_check_config(experiment):
    """Every shipped experiment is runnable as is: it composes and passes the range checks."""
    cfg = compose_train([f"experiment={experiment}"])
    check_config(cfg)
    assert cfg.name == experiment


@pytest.mark.parametrize("group", GROUPS)
def test_options_within_a_group_have_identical_keys(group):
    """Every option spells out the same keys, so none silently falls back to a schema default."""
    keysets = {
        path.stem: set(OmegaConf.load(path).keys()) for path in sorted((CONF_DIR / group).glob("*.yaml"))
    }
    reference = next(iter(keysets.values()))
    assert all(keys == reference for keys in keysets.values()), keysets


def test_lora_overrides_set_rank_and_alpha():
    """`lora.rank=16 lora.alpha=32` (one point of a sweep) reaches the config unchanged."""
    cfg = compose_train(["lora.rank=16", "lora.alpha=32"])
    assert cfg.lora.rank == 16 and isinstance(cfg.lora.rank, int)
    assert cfg.lora.alpha == 32.0


def test_guidance_scale_override_and_cfg1_option():
    """`guidance.scale=1` is accepted as a float, and `guidance=cfg1` means scale 1.0."""
    cfg = compose_train(["guidance.scale=1"])
    assert cfg.guidance.scale == 1.0 and isinstance(cfg.guidance.scale, float)
    assert compose_train(["guidance=cfg1"]).guidance.scale == 1.0
    assert compose_train([]).guidance.scale == 7.5


@pytest.mark.parametrize(
    ("override", "key"),
    [("lora.rank=abc", "lora.rank"), ("guidance.scale=abc", "guidance.scale"), ("train.max_steps=x", "train.max_steps")],
)
def test_wrong_type_fails_at_compose_time(override, key):
    """A value of the wrong type is rejected when composing, naming the key."""
    with pytest.raises(ConfigCompositionException) as info:
        compose_train([override])
    assert key in str(info.value.__cause__)


@pytest.mark.parametrize("override", ["lora.rnak=4", "train.leraning_rate=1e-3", "scheduler.stpes=4"])
def test_unknown_key_fails_at_compose_time(override):
    """A typo in a key name is an error, not a silently ignored setting."""
    with pytest.raises(ConfigCompositionException, match="Could not override"):
        compose_train([override])


def test_unknown_group_option_lists_the_valid_options():
    """`model=sdxxl` fails with a message that lists the options the user can pick."""
    with pytest.raises(MissingConfigException) as info:
        compose_train(["model=sdxxl"])
    message = str(info.value)
    assert "Available options" in message
    for option in ("sd15", "sdxl", "tiny_sd15", "tiny_sdxl"):
        assert option in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("lora.rank=0", "lora.rank"),
        ("lora.rank=-4", "lora.rank"),
        ("lora.alpha=0", "lora.alpha"),
        ("lora.alpha=-1", "lora.alpha"),
        ("dataset.holdout_fraction=1.0", "dataset.holdout_fraction"),
        ("dataset.holdout_fraction=1.5", "dataset.holdout_fraction"),
        ("dataset.resolution=100", "dataset.resolution"),
        ("dataset.resolution=0", "dataset.resolution"),
        ("scheduler.name=euler", "scheduler.name"),
        ("scheduler.steps=0", "scheduler.steps"),
        ("train.lr=0", "train.lr"),
        ("train.max_steps=null", "train.max_steps"),
    ],
)
def test_check_config_rejects_out_of_range_values(override, key):
    """Values the types allow but training can't use fail with a message naming the key."""
    cfg = compose_train(["experiment=demo", override])
    with pytest.raises(ValueError, match="invalid config") as info:
        check_config(cfg)
    assert key in str(info.value)


def test_check_config_accepts_boundary_values():
    """Valid edge values pass: holdout 0, resolution a multiple of 8, alpha != rank, ddpm."""
    check_config(
        compose_train(
            ["experiment=demo", "dataset.holdout_fraction=0", "dataset.resolution=72", "lora.rank=1",
             "lora.alpha=0.5", "scheduler=ddpm"]
        )
    )


def test_check_config_reports_every_error_at_once():
    """All problems are listed in one error, so the user fixes them in one go."""
    cfg = compose_train(["experiment=demo", "lora.rank=0", "lora.alpha=0", "scheduler.name=euler"])
    with pytest.raises(ValueError) as info:
        check_config(cfg)
    for key in ("lora.rank", "lora.alpha", "scheduler.name"):
        assert key in str(info.value)


def test_demo_experiment_is_tiny_offline_sdxl():
    """experiment=demo needs no download: tiny SDXL on synthetic data."""
    cfg = compose_train(["experiment=demo"])
    assert cfg.model.pretrained == "tiny"
    assert cfg.model.family == "sdxl"
    assert cfg.dataset.source == "synthetic"
    assert cfg.scheduler.name == "ddim"


def test_ghibli100_sdxl_experiment_is_the_seed_study():
    """experiment=ghibli100_sdxl: SDXL, 512 px, batch 1, lr 1e-4, 100 epochs, no step cap."""
    cfg = compose_train(["experiment=ghibli100_sdxl"])
    assert cfg.model.family == "sdxl"
    assert cfg.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert cfg.dataset.name == "ghibli100"
    assert cfg.dataset.resolution == 512
    assert cfg.train.batch_size == 1
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.epochs == 100
    assert cfg.train.max_steps is None


def test_experiment_leaves_sweep_overrides_in_charge():
    """Command-line overrides win over the experiment file (the sweep in the file's header)."""
    cfg = compose_train(["experiment=ghibli100_sdxl", "lora.rank=16", "lora.alpha=32", "train.epochs=3"])
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.train.epochs) == (16, 32.0, 3)
