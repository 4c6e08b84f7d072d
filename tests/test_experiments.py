"""The seed studies as one-command experiments (conf/experiment/): each composes with the settings
the study names, trains two steps when its model is swapped for the tiny one of the same family,
opens with the command that runs it, and has a study README that gives that command."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from ghibli_lab.config import check_config
from ghibli_lab.train import train

from .conftest import CONF_DIR, ROOT, compose_train

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
NOT_STUDIES = {"demo", "optuna_demo", "multistyle_demo"}  # the offline demos: no study README
STUDIES = [name for name in EXPERIMENTS if name not in NOT_STUDIES]
ATTENTION = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


def check_sd15_real2ghibli(cfg, full: bool) -> None:
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (32, 64, 0.1)
    assert list(cfg.lora.target_modules) == ATTENTION
    assert cfg.lora.text_encoder and list(cfg.lora.text_encoder_target_modules) == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert (cfg.train.lr, cfg.train.lr_scheduler, cfg.train.early_stop_patience, cfg.train.loss_guidance) == (1e-4, "cosine", 3, 1.0)
    assert cfg.train.val_every > 0 and cfg.dataset.holdout_fraction == 0.1 and cfg.method.name == "lora"
    if full:
        assert (cfg.model.family, cfg.model.pretrained) == ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5")
        assert cfg.dataset.name == "real2ghibli5k" and cfg.dataset.resolution == 512
        assert (cfg.train.epochs, cfg.train.max_steps, cfg.train.batch_size) == (10, None, 4)


def check_conan_sdxl(cfg, full: bool) -> None:
    assert (cfg.lora.rank, cfg.lora.alpha) == (16, 16) and cfg.lora.text_encoder
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.grad_accum) == (1e-5, 500, 8)
    assert cfg.train.lr_scheduler == "constant_with_warmup"  # diffusers' "constant" would ignore the warmup
    assert cfg.dataset.caption_prefix == "Still from the Anime, "
    if full:
        assert (cfg.model.family, cfg.model.pretrained) == ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0")
        assert cfg.model.vae == "madebyollin/sdxl-vae-fp16-fix"
        assert (cfg.dataset.name, cfg.dataset.path, cfg.dataset.resolution) == ("conan", "jugg1024/conan-gpt4-captions", 1024)
        assert (cfg.train.batch_size, cfg.train.mixed_precision, cfg.train.epochs, cfg.train.max_steps) == (1, "bf16", 10, None)


def check_multistyle_sd15(cfg, full: bool) -> None:
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.train.lr) == (16, 16, 1e-4)
    if full:
        assert (cfg.model.family, cfg.dataset.source, cfg.dataset.style) == ("sd15", "folder", "ghibli")
        assert cfg.dataset.path  # ${oc.env:STYLES_DIR,data/styles}
        assert (cfg.train.max_steps, cfg.train.batch_size) == (2000, 4)


def check_ghibli100_sdxl(cfg, full: bool) -> None:
    assert (cfg.train.lr, cfg.train.batch_size, cfg.lora.text_encoder) == (1e-4, 1, False)
    if full:
        assert (cfg.model.family, cfg.dataset.name, cfg.dataset.resolution) == ("sdxl", "ghibli100", 512)
        assert (cfg.train.epochs, cfg.train.max_steps) == (100, None)


# study -> (the tiny model of its family, extra overrides for the 2-step run, its settings)
TINY = {
    "sd15_real2ghibli": ("tiny_sd15", ["train.grad_accum=1"], check_sd15_real2ghibli),
    "conan_sdxl": ("tiny_sdxl", [], check_conan_sdxl),  # keeps batch 1 x 8 accumulated: 16 tiny micro-batches
    "multistyle_sd15": ("tiny_sd15", ["train.grad_accum=1", "dataset.style=watercolor"], check_multistyle_sd15),
    "ghibli100_sdxl": ("tiny_sdxl", ["train.grad_accum=1"], check_ghibli100_sdxl),
}


def test_every_study_is_covered():
    assert sorted(TINY) == STUDIES


@pytest.mark.parametrize("name", STUDIES)
def test_study_composes_and_trains_two_steps_on_the_tiny_model(name, tmp_path):
    model, extra, check = TINY[name]
    full = compose_train([f"experiment={name}"])
    check_config(full)
    check(full, full=True)

    cfg = compose_train([
        f"experiment={name}", f"model={model}", "model.vae=null", "dataset=synthetic", "dataset.num_images=12",
        "dataset.resolution=64", "logger=none", "train.max_steps=2", "train.epochs=null", "train.batch_size=1",
        "train.mixed_precision=no", "train.checkpoint_every=0", "train.num_workers=0", "scheduler.steps=2",
        "sample.seeds=[0]", f"cache_dir={tmp_path / 'cache'}", *extra,
    ])
    check(cfg, full=False)  # the study's own settings survive the shrinking overrides
    summary = train(cfg, tmp_path / "run")
    assert summary["steps"] == 2
    weights = tmp_path / "run" / "lora"
    assert (weights / "pytorch_lora_weights.safetensors").is_file() and (weights / "lora_kohya.safetensors").is_file()


def header(name: str) -> str:
    """The command a conf/experiment file opens with: the first comment line after the package line."""
    lines = (CONF_DIR / "experiment" / f"{name}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_", name
    return lines[1]


def train_commands(name: str) -> list[str]:
    """Every `python -m ghibli_lab.train ...` in the file's comments, as its overrides."""
    commands = []
    for line in (CONF_DIR / "experiment" / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#") and "python -m ghibli_lab.train" in line:
            commands.append(line.split("python -m ghibli_lab.train", 1)[1])
    return commands


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_opens_with_the_command_that_runs_it(name):
    line = header(name)
    assert "python -m ghibli_lab.train" in line and f"experiment={name}" in shlex.split(line), line
    if name in NOT_STUDIES:
        return
    assert line.startswith(("# python ", "# HF_HUB_OFFLINE=1 python ")), line
    readme = ROOT / "experiments" / name / "README.md"
    assert readme.is_file(), f"{readme} is missing"
    assert line[2:] in readme.read_text(), f"{readme} does not give the command {line[2:]!r}"
    assert f"[{name}]({name}/)" in (ROOT / "experiments" / "README.md").read_text()


@pytest.mark.parametrize("name", STUDIES)
def test_the_commands_in_a_study_compose(name):
    """The header and every commented training command compose, at the first and at the last
    value of each swept key (a typo in a documented command fails here, not on the GPU)."""
    parser = OverridesParser.create()
    for command in train_commands(name):
        args = [a for a in shlex.split(command) if a != "-m" and not a.startswith("hydra")]
        overrides = parser.parse_overrides(args)
        assert f"experiment={name}" in args, command
        choices = [
            [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [arg]
            for arg, o in zip(args, overrides)
        ]
        for pick in {tuple(c[0] for c in choices), tuple(c[-1] for c in choices)}:
            check_config(compose_train(list(pick)))


def test_sweeps_in_the_studies_sweep_what_they_say():
    """The headers sweep what the study compares: sampling (trained once), styles (one adapter
    each), the rank x alpha grid; the Conan study is one run."""
    parser = OverridesParser.create()

    def swept(name: str) -> dict[str, list[str]]:
        args = [a for a in shlex.split(header(name)[2:]) if a not in ("-m", "python", "ghibli_lab.train") and "=" in a]
        return {o.get_key_element(): list(o.sweep_string_iterator()) for o in parser.parse_overrides(args) if o.is_sweep_override()}

    assert swept("sd15_real2ghibli") == {"scheduler": ["ddpm", "ddim"], "guidance.scale": ["1", "7.5"]}
    assert swept("multistyle_sd15") == {"dataset.style": ["ghibli", "shinkai", "comic"]}
    assert swept("ghibli100_sdxl") == {"lora.rank": ["4", "8", "16"], "lora.alpha": ["4", "8", "16", "32"]}
    assert swept("conan_sdxl") == {}
