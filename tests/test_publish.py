"""The model card of a run and publishing it: the card's metadata and numbers, its determinism,
the dry run's file list, and the clear failures (no token, offline, not a finished run)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
from huggingface_hub import metadata_load
from omegaconf import OmegaConf

from ghibli_lab.card import write_model_card
from ghibli_lab.evaluate import evaluate
from ghibli_lab.hub import OfflineError
from ghibli_lab.publish import DRY_RUN_FILE, PublishError, publish
from ghibli_lab.train import train

from .conftest import ROOT, compose_train

PREFIX = "ghibli style, "
REPO = "someone/tiny-ghibli-lora"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny finished run (rank 4, alpha 8, a caption prefix), with a checkpoint, laid out as
    `train` leaves it."""
    root = tmp_path_factory.mktemp("publish")
    cfg = compose_train(
        [
            "experiment=demo",
            "logger=none",
            "lora.rank=4",
            "lora.alpha=8",
            "train.max_steps=2",
            "train.val_every=2",
            "train.checkpoint_every=1",
            "dataset.num_images=20",
            f"dataset.caption_prefix='{PREFIX}'",
            "scheduler.steps=2",
            "sample.seeds=[0]",
            "sample.prompts=[a hill]",
            f"cache_dir={root / 'cache'}",
        ]
    )
    run = root / "0_lora.alpha-8"
    train(cfg, run)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run


@pytest.fixture(scope="module")
def evaluated(run, tmp_path_factory):
    """A copy of the run, evaluated (tiny features, 2 sampling steps)."""
    copy = tmp_path_factory.mktemp("evaluated") / run.name
    shutil.copytree(run, copy)
    evaluate(compose_train([f"run_dir={copy}", "eval.features=tiny", "eval.steps=2", "eval.bootstrap_draws=200"], config_name="evaluate"))
    return copy


def compose_publish(*overrides: str):
    return compose_train(list(overrides), config_name="publish")


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No Hugging Face token anywhere: not in the environment, not in an (empty) HF home.
    huggingface_hub reads HF_HOME / HF_TOKEN_PATH once, at import, into constants.HF_TOKEN_PATH,
    so that is pointed at the empty home too."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(home / "token"))
    assert huggingface_hub.get_token() is None


def test_card_has_the_hub_metadata_the_trigger_and_the_lora_settings(run):
    card = write_model_card(run)
    assert card == run / "README.md"
    text = card.read_text()
    meta = metadata_load(card)  # the hub's own front-matter reader
    assert meta["library_name"] == "diffusers"
    assert meta["license"] == "openrail++"  # SDXL
    assert meta["tags"] == ["text-to-image", "stable-diffusion-xl", "lora", "diffusers", "ghibli_lab"]
    assert meta["instance_prompt"] == PREFIX
    assert "widget" not in meta
    assert "base_model" not in meta  # "tiny" is no hub model id: named in the body only
    assert "| base model | `tiny`" in text
    assert "| LoRA rank / alpha | 4 / 8 (scale alpha/rank = 2) |" in text
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['n_train']} images trained on, {summary['n_holdout']} held out" in text
    assert "| training steps | 2 " in text
    assert "![samples: base model on top, this model below](samples/final.png)" in text
    assert "Not evaluated yet" in text
    assert "pipe.load_lora_weights(weights, subfolder='lora', weight_name='pytorch_lora_weights.safetensors')" in text
    assert "`lora/lora_kohya.safetensors`" in text and "models/loras/" in text
    assert str(run) not in text  # no machine paths: the card is the same wherever the run lies


def test_card_with_a_hub_base_model_and_an_sd15_license(run, tmp_path):
    copy = tmp_path / run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = OmegaConf.load(copy / ".hydra" / "config.yaml")
    cfg.model.family, cfg.model.pretrained = "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5"
    OmegaConf.save(cfg, copy / ".hydra" / "config.yaml")
    meta = metadata_load(write_model_card(copy, repo_id=REPO))
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["license"] == "creativeml-openrail-m"
    assert "stable-diffusion" in meta["tags"]
    assert f"weights = '{REPO}'" in (copy / "README.md").read_text()


def test_card_shows_held_out_metrics_with_intervals_and_is_byte_identical(evaluated):
    first = write_model_card(evaluated).read_bytes()
    text = first.decode()
    m = json.loads((evaluated / "eval" / "metrics.json").read_text())
    (kid_line,) = [line for line in text.splitlines() if line.startswith("| KID")]
    d = m["paired"]["kid"]
    assert f"{m['lora']['kid']:.4g}" in kid_line and f"{m['base']['kid']:.4g}" in kid_line
    assert f"{d['diff']:+.4g} [{d['low']:.4g}, {d['high']:.4g}]" in kid_line
    assert any(line.startswith("| held-out val loss") for line in text.splitlines())
    assert "diversity" not in text  # one image per caption: no diversity, so not shown
    assert f"{m['protocol']['n_fake']} generated vs {m['protocol']['n_real']} held-out images" in text
    assert "Not evaluated yet" not in text
    assert write_model_card(evaluated).read_bytes() == first  # same run, same bytes
    assert not list(evaluated.glob(".README.md*"))  # no temp file left


def test_dry_run_lists_the_files_with_their_hashes_and_needs_no_token_or_network(evaluated, no_token):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: any network use would fail
    result = publish(compose_publish(f"run_dir={evaluated}", f"repo_id={REPO}", "dry_run=true"))
    plan = json.loads((evaluated / DRY_RUN_FILE).read_text())
    assert result["dry_run"] and result["plan"] == evaluated / DRY_RUN_FILE
    assert plan["repo_id"] == REPO and plan["private"] is True
    paths = [f["path_in_repo"] for f in plan["files"]]
    assert paths == [
        "README.md",
        "eval/metrics.json",
        "lora/lora_kohya.safetensors",
        "lora/pytorch_lora_weights.safetensors",
        "samples/final.png",
        "summary.json",
        "training_config.yaml",
    ]
    assert (evaluated / "checkpoints").is_dir()  # there are checkpoints, and none is listed
    for f in plan["files"]:
        local = evaluated / ".hydra" / "config.yaml" if f["path_in_repo"] == "training_config.yaml" else evaluated / f["path_in_repo"]
        assert f["local_path"] == str(local.resolve())
        assert f["bytes"] == local.stat().st_size and f["sha256"] == sha256(local)
    summary = json.loads((evaluated / "summary.json").read_text())
    assert set(summary["weights_files"].values()) <= set(paths)
    # The published card names the repo in its loading snippet.
    assert f"weights = '{REPO}'" in (evaluated / "README.md").read_text()


def test_upload_without_a_token_fails_with_the_login_message(run, no_token):
    before = (run / "README.md").read_bytes() if (run / "README.md").exists() else None
    with pytest.raises(PublishError, match="no Hugging Face token") as err:
        publish(compose_publish(f"run_dir={run}", f"repo_id={REPO}"))
    assert "HF_TOKEN" in str(err.value) and "dry_run=true" in str(err.value)
    assert ((run / "README.md").read_bytes() if (run / "README.md").exists() else None) == before  # nothing written


def test_upload_in_offline_mode_fails_naming_dry_run(run, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_dummy_token_for_tests")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE=1") as err:
        publish(compose_publish(f"run_dir={run}", f"repo_id={REPO}"))
    assert "dry_run=true" in str(err.value)


def test_unfinished_runs_and_bad_input_fail_clearly(run, tmp_path):
    def fails(run_dir, match, repo_id=REPO):
        with pytest.raises(PublishError, match=match):
            publish(compose_publish(f"run_dir={run_dir}", f"repo_id={repo_id}", "dry_run=true"))

    fails(tmp_path / "nope", "does not exist")
    fails(tmp_path, "not a training run dir")
    unfinished = tmp_path / "unfinished"
    (unfinished / ".hydra").mkdir(parents=True)
    shutil.copy(run / ".hydra" / "config.yaml", unfinished / ".hydra" / "config.yaml")
    fails(unfinished, r"has not finished training \(no lora/ and no summary.json\)")
    assert not (unfinished / "README.md").exists() and not (unfinished / DRY_RUN_FILE).exists()
    fails(run, "not a valid hub repo id", repo_id="not//valid")


def test_the_command_line_dry_run(run, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf_home"))
    env.pop("HF_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "-m", "ghibli_lab.publish", f"run_dir={run}", f"repo_id={REPO}", "dry_run=true"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "nothing uploaded" in proc.stdout and "lora/pytorch_lora_weights.safetensors" in proc.stdout
    assert json.loads((run / DRY_RUN_FILE).read_text())["repo_id"] == REPO
    assert not (run / ".hydra" / "overrides.yaml").exists()  # no .hydra/ output: the run's config stays the training one

