"""Training on the tiny models: it runs, it learns, it leaves the files users rely on."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from ghibli_lab.data import ImageCaptionDataset, collate, load_records
from ghibli_lab.adapters import attach_lora
from ghibli_lab.pipeline import OfflineError, build_tiny_pipeline, training_scheduler
from ghibli_lab.encode import encode_validation_set
from ghibli_lab.loss import training_loss, validation_loss
from ghibli_lab.train import train




WIDE_TARGETS = "[to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2]"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model,precision", [("tiny_sd15", "no"), ("tiny_sdxl", "no"), ("tiny_sdxl", "bf16")])
def test_tiny_models_train_and_leave_complete_run_dir(tiny_cfg, tmp_path, model, precision):
    """Both architectures train a few steps (also with bf16 frozen weights) and leave LoRA files,
    metrics, summary and samples; the exported LoRA weights are fp16 (lora.save_dtype's default)."""
    cfg = tiny_cfg(f"model={model}", "lora.text_encoder=true", f"train.mixed_precision={precision}")
    run_dir = tmp_path / "run"
    summary = train(cfg, run_dir)

    assert summary["steps"] == 4
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    kohya = load_file(run_dir / "lora" / "lora_kohya.safetensors")
    assert any(k.startswith("lora_unet_") for k in kohya)
    assert any(k.startswith("lora_te") for k in kohya)  # text-encoder LoRA was trained and saved
    assert {v.dtype for v in kohya.values()} == {torch.float16}
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val/loss" in r] == [0, 2, 4]
    assert all(set(r) <= {"step", "train/loss", "train/lr", "train/epoch", "val/loss"} for r in rows)
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows if "train/loss" in r)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["val/loss"] == pytest.approx(rows[-1]["val/loss"])
    assert on_disk["n_train"] + on_disk["n_holdout"] == 12 and on_disk["n_holdout"] >= 1
    grid = Image.open(run_dir / "samples" / "final.png")
    assert grid.height == 2 * 64  # base row and LoRA row


def test_overfitting_one_batch_lowers_fixed_timestep_loss(tiny_cfg, tmp_path):
    """A learning test: repeated steps on one batch must drive its fixed-timestep loss down."""
    # LoRA on the convolutions and feed-forwards too: attention alone has little capacity in the tiny UNet.
    cfg = tiny_cfg("lora.rank=8", "lora.alpha=8", "train.snr_gamma=null", f"lora.target_modules={WIDE_TARGETS}")
    torch.manual_seed(0)
    pipe = build_tiny_pipeline("sdxl")
    params = attach_lora(pipe, cfg.lora)
    scheduler = training_scheduler(pipe)
    records = load_records(cfg.dataset, cfg.cache_dir)[:4]
    fixed = encode_validation_set(pipe, ImageCaptionDataset(records, cfg.dataset.resolution, True, False), batch_size=4)
    train_batch = collate([ImageCaptionDataset(records, cfg.dataset.resolution, True, False)[i] for i in range(4)])
    before = validation_loss(pipe, fixed, scheduler, list(cfg.train.val_timesteps), cfg.seed)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(30):
        loss = training_loss(pipe, train_batch, scheduler, torch.float32, cfg.train.noise_offset, cfg.train.snr_gamma).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = validation_loss(pipe, fixed, scheduler, list(cfg.train.val_timesteps), cfg.seed)
    assert after < 0.7 * before, (before, after)


def test_validation_does_not_change_the_training_trajectory(tiny_cfg, tmp_path):
    """Validation saves and restores the RNG: the LoRA is the same with or without it."""
    a = train(tiny_cfg("train.val_every=1"), tmp_path / "a")
    b = train(tiny_cfg("train.val_every=0"), tmp_path / "b")
    wa = load_file(tmp_path / "a" / "lora" / "pytorch_lora_weights.safetensors")
    wb = load_file(tmp_path / "b" / "lora" / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["train/loss"] == b["train/loss"]


def test_same_seed_same_adapter_different_seed_different(tiny_cfg, tmp_path):
    train(tiny_cfg("seed=1"), tmp_path / "a")
    train(tiny_cfg("seed=1"), tmp_path / "b")
    train(tiny_cfg("seed=2"), tmp_path / "c")
    w = {n: load_file(tmp_path / n / "lora" / "pytorch_lora_weights.safetensors") for n in "abc"}
    assert all(torch.equal(w["a"][k], w["b"][k]) for k in w["a"])
    assert not all(torch.equal(w["a"][k], w["c"][k]) for k in w["a"])


# -- bad input fails before any model loads, with a message naming the problem ------------------


def test_nonpositive_rank_or_alpha_is_rejected(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"lora\.rank must be > 0, got 0"):
        train(tiny_cfg("lora.rank=0"), tmp_path / "r")
    with pytest.raises(ValueError, match=r"lora\.alpha must be > 0, got -1"):
        train(tiny_cfg("lora.alpha=-1"), tmp_path / "a")
    assert not (tmp_path / "r" / "lora").exists()


def test_missing_or_empty_folder_is_rejected(tiny_cfg, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"dataset\.path='?{re.escape(str(missing))}'? does not exist"):
        train(tiny_cfg("dataset=folder", f"dataset.path={missing}"), tmp_path / "run")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images"):
        train(tiny_cfg("dataset=folder", f"dataset.path={empty}"), tmp_path / "run")


def test_hub_model_while_offline_says_how_to_use_a_local_copy(tiny_cfg, tmp_path):
    start = time.time()
    with pytest.raises(OfflineError) as err:
        train(tiny_cfg("model=sdxl"), tmp_path / "run")
    message = str(err.value)
    assert "stabilityai/stable-diffusion-xl-base-1.0" in message
    assert "model.pretrained=/path/to/" in message and "huggingface-cli download" in message
    assert time.time() - start < 10  # fails at once, no hub time-out


def test_folder_dataset_trains(tiny_cfg, tmp_path):
    """A plain folder of images with .txt captions is a dataset."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (80, 64), (40 * i, 100, 200 - 20 * i)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    summary = train(tiny_cfg("dataset=folder", f"dataset.path={folder}", "dataset.resolution=64"), tmp_path / "run")
    assert summary["n_train"] + summary["n_holdout"] == 6


# -- the CLI, as a user runs it -------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GHIBLI_LAB_CACHE": str(cwd / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "ghibli_lab.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_multirun_grid_makes_one_complete_run_dir_per_job(tmp_path):
    """`-m lora.rank=4,8 lora.alpha=4,8` gives 4 isolated runs, each with both LoRA files,
    metrics, samples, its config and an offline W&B run; outputs/latest points at the sweep."""
    proc = run_cli(
        "-m", "experiment=demo", "lora.rank=4,8", "lora.alpha=4,8",
        "train.max_steps=3", "train.val_every=3", "train.checkpoint_every=0", "dataset.num_images=8",
        "scheduler.steps=2", "sample.seeds=[0]",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    latest = tmp_path / "outputs" / "latest"
    assert latest.is_symlink() and "sweeps" in os.readlink(latest)
    runs = sorted(p for p in latest.iterdir() if p.is_dir() and not p.name.startswith("."))  # .trained: the sweep's registry
    assert [r.name for r in runs] == [
        "0_lora.alpha-4_lora.rank-4",
        "1_lora.alpha-8_lora.rank-4",
        "2_lora.alpha-4_lora.rank-8",
        "3_lora.alpha-8_lora.rank-8",
    ]
    for run in runs:
        for f in ["lora/pytorch_lora_weights.safetensors", "lora/lora_kohya.safetensors", "metrics.jsonl",
                  "summary.json", "samples/final.png", ".hydra/config.yaml", "README.md"]:
            assert (run / f).is_file(), f"{run.name}: {f} missing"
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        rank, alpha = int(run.name.split("rank-")[1]), int(run.name.split("alpha-")[1].split("_")[0])
        assert (cfg.lora.rank, cfg.lora.alpha) == (rank, alpha)
        assert f"| LoRA rank / alpha | {rank} / " in (run / "README.md").read_text()  # the model card
        kohya = load_file(run / "lora" / "lora_kohya.safetensors")
        assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {float(alpha)}
        assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run"
    # The sweep shares one latent/text cache: the first job encodes, the others only reuse.
    caches = [json.loads((run / "summary.json").read_text())["cache"] for run in runs]
    assert caches[0]["encoded"] > 0 and caches[0]["reused"] < caches[0]["encoded"]
    assert all(c["encoded"] == 0 and c["reused"] == caches[0]["encoded"] + caches[0]["reused"] for c in caches[1:])


def test_cli_bad_inputs_fail_with_clear_messages(tmp_path):
    proc = run_cli("model=sdxxl", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'model/sdxxl'" in proc.stderr and "tiny_sd15" in proc.stderr  # lists valid options
    proc = run_cli("experiment=demo", "lora.rank=-4", cwd=tmp_path)
    assert proc.returncode != 0 and "lora.rank must be > 0, got -4" in proc.stderr


@pytest.mark.slow
def test_full_size_sd15_with_random_weights_trains_through_train(tiny_cfg, tmp_path):
    """model.pretrained=random builds the published SD 1.5 architecture with random weights, no
    download: one step at 256 px on CPU through the real entry point, files and all."""
    cfg = tiny_cfg(
        "model=sd15", "model.pretrained=random", "lora=r4a8", "dataset.resolution=256", "dataset.num_images=4",
        "train.max_steps=1", "train.batch_size=1", "train.val_every=0", "train.val_timesteps=[500]",
        "scheduler.steps=1", "sample.prompts=[a hill]", "sample.seeds=[0]",
    )
    start = time.time()
    summary = train(cfg, tmp_path / "run")
    print(f"1 step of full-size SD 1.5 at 256 px on CPU through train(): {time.time() - start:.0f} s")
    assert summary["steps"] == 1 and summary["trainable_params"] > 0
    assert (tmp_path / "run" / "lora" / "lora_kohya.safetensors").is_file()
    assert Image.open(tmp_path / "run" / "samples" / "final.png").height == 2 * 256
    from ghibli_lab.pipeline import load_pipeline

    pipe = load_pipeline(cfg.model)
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964  # the published count
