"""The method axis: LoRA, DoRA, full fine-tune, DreamBooth and textual inversion train through the
same train(cfg), save in the formats other tools load, reload exactly, resume exactly, and go
through evaluation, generate and the report side by side with their costs."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from ghibli_lab import methods
from ghibli_lab.adapters import KOHYA_FILE, attach_lora, kohya_state_dict, without_adapter
from ghibli_lab.config import ConfigError, LoraConfig, check_config
from ghibli_lab.loss import batch_mean
from ghibli_lab.pipeline import build_tiny_pipeline, load_pipeline
from ghibli_lab.runs import load_run_config
from ghibli_lab.sampling import generate
from ghibli_lab.train import train

from .conftest import ROOT, compose_train, group_option

METHODS = ["lora", "dora", "full", "dreambooth", "textual_inversion"]


def train_run(tiny_cfg, run: Path, *overrides: str) -> dict:
    """train() as the CLI would call it, with the run's .hydra/config.yaml written first."""
    cfg = tiny_cfg("train.max_steps=2", "lora.save_dtype=fp32", "method.num_class_images=2", *overrides)
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return train(cfg, run)


def final_tiles(run: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """The base and trained images of samples/final.png's first column, and the grid's JSON."""
    meta = json.loads((run / "samples" / "final.json").read_text())
    grid = Image.open(run / "samples" / "final.png").convert("RGB")
    r = meta["resolution"]
    label = grid.width - r * len(meta["columns"])
    return np.asarray(grid.crop((label, 0, label + r, r))), np.asarray(grid.crop((label, r, label + r, 2 * r))), meta


# Each method with its widest setting: DoRA and the full fine-tune on the text encoders too,
# textual inversion with two vectors per token.
RELOAD_CASES = {
    "lora": [],
    "dora": ["lora.text_encoder=true"],
    "full": ["method.full_text_encoders=true"],
    "dreambooth": [],
    "textual_inversion": ["method.num_vectors=2"],
}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("method", METHODS)
def test_each_method_reloads_into_a_fresh_pipeline_and_reproduces_its_samples(tiny_cfg, tmp_path, method, family):
    run = tmp_path / "run"
    summary = train_run(tiny_cfg, run, f"method={method}", f"model=tiny_{family}", *RELOAD_CASES[method])
    base, trained, meta = final_tiles(run)
    assert not np.array_equal(base, trained), "the trained weights changed nothing: the test would prove nothing"

    cfg = load_run_config(run)
    fresh = load_pipeline(cfg.model)
    column = meta["columns"][0]
    settings = {k: meta[k] for k in ("scheduler", "steps", "guidance_scale", "resolution")}
    with methods.applied(fresh, methods.weights_dir(run, cfg)):
        (again,) = generate(fresh, [column["trained_prompt"]], [column["seed"]], **settings)
        with without_adapter(fresh):
            (base_again,) = generate(fresh, [column["prompt"]], [column["seed"]], **settings)
    np.testing.assert_array_equal(np.asarray(again), trained)
    np.testing.assert_array_equal(np.asarray(base_again), base)
    (after,) = generate(fresh, [column["prompt"]], [column["seed"]], **settings)
    np.testing.assert_array_equal(np.asarray(after), base)  # the pipeline is the base again after the block
    assert summary["method"] == method and summary["weights_bytes"] > 0 and summary["trainable_params"] > 0


def test_each_method_writes_the_files_its_tools_load(tiny_cfg, tmp_path):
    """full: a diffusers unet/ folder; textual inversion: A1111's emb_params (SD 1.5) and
    clip_l/clip_g (SDXL) rows; DoRA: the kohya file's dora_scale, no raw lora_magnitude_vector."""
    full = train_run(tiny_cfg, tmp_path / "full", "method=full", "model=tiny_sd15")
    unet_dir = tmp_path / "full" / "full" / "unet"
    assert (unet_dir / "config.json").is_file() and full["weights_files"] == {"unet": "full/unet/diffusion_pytorch_model.safetensors"}
    assert full["trainable_params"] == sum(p.numel() for p in build_tiny_pipeline("sd15").unet.parameters())

    sd15 = train_run(tiny_cfg, tmp_path / "ti15", "method=textual_inversion", "model=tiny_sd15", "method.num_vectors=3")
    rows = load_file(tmp_path / "ti15" / sd15["weights_files"]["embeddings"])
    assert list(rows) == ["emb_params"] and rows["emb_params"].shape == (3, 32)
    assert sd15["trainable_params"] == 3 * 32  # the new rows only, not the vocabulary
    sdxl = train_run(tiny_cfg, tmp_path / "tixl", "method=textual_inversion", "model=tiny_sdxl")
    rows = load_file(tmp_path / "tixl" / sdxl["weights_files"]["embeddings"])
    assert sorted(rows) == ["clip_g", "clip_l"] and rows["clip_l"].shape == (1, 32) and rows["clip_g"].shape == (1, 32)
    assert Path(sdxl["weights_files"]["embeddings"]).name == "ghibli-style.safetensors"  # A1111's trigger is the name

    train_run(tiny_cfg, tmp_path / "dora", "method=dora", "model=tiny_sdxl")
    kohya = load_file(tmp_path / "dora" / "lora" / KOHYA_FILE)
    assert not any("magnitude" in k for k in kohya)
    scales = {k: v for k, v in kohya.items() if k.endswith(".dora_scale")}
    assert len(scales) == sum(k.endswith(".lora_down.weight") for k in kohya) > 0
    for key, scale in scales.items():
        up = kohya[key.replace(".dora_scale", ".lora_up.weight")]
        assert scale.shape[0] == up.shape[0] and all(d == 1 for d in scale.shape[1:]), key


def test_text_embedding_table_and_base_unet_stay_frozen(tiny_cfg, tmp_path):
    """Textual inversion trains only its new rows: every base row of the table is the model's own."""
    cfg = tiny_cfg("method=textual_inversion", "model=tiny_sdxl")
    pipe = load_pipeline(cfg.model)
    params = methods.attach(pipe, cfg)
    assert [p.shape for p in params] == [(1, 32), (1, 32)]
    reference = build_tiny_pipeline("sdxl")
    for name in ("text_encoder", "text_encoder_2"):
        table = getattr(pipe, name).get_input_embeddings()
        assert not table.base.weight.requires_grad
        torch.testing.assert_close(table.base.weight, getattr(reference, name).get_input_embeddings().weight, rtol=0, atol=0)
    # The new rows start as the init word's embedding: prompting with the token is the word.
    ids = pipe.tokenizer(cfg.method.init_word, add_special_tokens=False).input_ids
    expected = reference.text_encoder.get_input_embeddings().weight[ids].mean(0)
    torch.testing.assert_close(params[0][0].detach(), expected.detach())


DORA_TARGETS = ["to_q", "conv1"]


def test_dora_scale_in_the_kohya_file_rebuilds_peft_s_merged_weight():
    """A loader that applies the kohya file's DoRA as defined (W' = dora_scale * (W + s*up@down) /
    ||W + s*up@down||_row, s = alpha / rank) gets exactly the weight peft trains, for Linear and
    Conv2d layers."""
    pipe = build_tiny_pipeline("sd15")
    lora = group_option(LoraConfig, "lora", "r8a8", target_modules=DORA_TARGETS, alpha=4.0)
    attach_lora(pipe, lora, dora=True)
    torch.manual_seed(0)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name or "magnitude" in name:  # away from the no-op start, magnitudes included
            p.data.add_(torch.randn_like(p) * 0.1)
    kohya = kohya_state_dict(pipe)
    layers = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
              "lora_unet_down_blocks_0_resnets_0_conv1": "down_blocks.0.resnets.0.conv1"}
    for prefix, module_name in layers.items():
        layer = pipe.unet.get_submodule(module_name)
        base = layer.base_layer.weight.detach().clone()
        up, down = kohya[f"{prefix}.lora_up.weight"], kohya[f"{prefix}.lora_down.weight"]
        scale = kohya[f"{prefix}.alpha"] / down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
        combined = base + scale * delta
        norm = combined.flatten(1).norm(dim=1).reshape(-1, *[1] * (base.dim() - 1))
        rebuilt = kohya[f"{prefix}.dora_scale"] * combined / norm
        layer.merge()
        torch.testing.assert_close(rebuilt, layer.base_layer.weight.detach(), rtol=1e-5, atol=1e-6)


def test_dreambooth_class_images_are_generated_once_and_weighted_in_the_loss(tiny_cfg, tmp_path, caplog):
    first = train_run(tiny_cfg, tmp_path / "a", "method=dreambooth", "model=tiny_sd15", "method.num_class_images=3")
    images = sorted((tmp_path / "cache" / "class_images").rglob("*.png"))
    assert len(images) == 3
    stamps = [p.stat().st_mtime_ns for p in images]
    caplog.set_level(logging.INFO, logger="ghibli_lab.methods")
    train_run(tiny_cfg, tmp_path / "b", "method=dreambooth", "model=tiny_sd15", "method.num_class_images=3", "lora.rank=4")
    assert "reusing 3 class images" in caplog.text
    assert [p.stat().st_mtime_ns for p in images] == stamps
    assert first["train/loss"] is not None
    # Ruiz et al. eq. 2: instance mean + lambda x class mean.
    per_sample = torch.tensor([1.0, 10.0, 3.0, 30.0])
    batch = {"loss_weight": torch.tensor([1.0, 0.5, 1.0, 0.5]), "prior": torch.tensor([False, True, False, True])}
    assert batch_mean(per_sample, batch).item() == pytest.approx((1 + 3) / 2 + 0.5 * (10 + 30) / 2)
    assert batch_mean(per_sample, {}).item() == pytest.approx(per_sample.mean().item())


def test_dreambooth_over_the_full_unet(tiny_cfg, tmp_path):
    summary = train_run(tiny_cfg, tmp_path / "run", "method=dreambooth", "method.weights=full", "model=tiny_sd15")
    assert summary["weights_files"] == {"unet": "full/unet/diffusion_pytorch_model.safetensors"}
    base, trained, _ = final_tiles(tmp_path / "run")
    assert not np.array_equal(base, trained)


@pytest.mark.parametrize("method", ["full", "textual_inversion", "dreambooth"])
def test_every_method_resumes_exactly(tiny_cfg, tmp_path, method):
    args = (f"method={method}", "model=tiny_sd15", "train.checkpoint_every=2", "train.cache=false")
    train_run(tiny_cfg, tmp_path / "straight", *args, "train.max_steps=4")
    train_run(tiny_cfg, tmp_path / "resumed", *args, "train.max_steps=2")
    train_run(tiny_cfg, tmp_path / "resumed", *args, "train.max_steps=4", "train.resume=auto")
    a, b = (tmp_path / n for n in ("straight", "resumed"))
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    for f in sorted(p.relative_to(a) for p in (a / methods.WEIGHTS_DIRS[load_run_config(a).method.weights]).rglob("*.safetensors")):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=textual_inversion", "method.token=null"], "needs method.token and method.init_word"),
        (["method=textual_inversion", "method.trigger=a "], "must occur in method.trigger"),
        (["method=lora", "method.full_text_encoders=true"], "method.full_text_encoders is for method.weights=full"),
        (["method=dreambooth", "method.class_prompt=null"], "needs method.num_class_images > 0 and a method.class_prompt"),
        (["method=full", "method.weights=adapter"], "method.weights='adapter' is not one of"),
    ],
)
def test_bad_method_configs_fail_naming_the_key(tiny_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(tiny_cfg(*overrides))


def test_8bit_adam_without_a_gpu_says_what_to_do(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="train.optimizer=adamw8bit"):
        train_run(tiny_cfg, tmp_path / "run", "method=full", "train.optimizer=adamw8bit")


def test_five_method_sweep_trains_evaluates_and_reports_side_by_side(tmp_path):
    """The issue's demo: one multirun over the method axis, its evaluation and its report, with
    the cost columns (trainable params, file size, peak memory, wall time, steps/s)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    common = [f"output_root={tmp_path}", f"cache_dir={tmp_path / 'cache'}", "logger=none"]
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = run("ghibli_lab.train", "-m", "experiment=demo", f"method={','.join(METHODS)}", "train.max_steps=6",
              "dataset.num_images=20", "method.num_class_images=2", *common)
    assert out.returncode == 0, out.stderr[-3000:]
    (sweep,) = (tmp_path / "sweeps").glob("*/*")
    out = run("ghibli_lab.evaluate", f"run_dir={sweep}", "eval.steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    out = run("ghibli_lab.report", f"sweep_dir={sweep}", "wandb=false")
    assert out.returncode == 0, out.stderr[-3000:]

    table = (sweep / "eval_table.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in table
    assert "| run | method | trainable params | file size (MB) | peak memory (MB) | wall time (s) | steps/s |" in table
    assert "different protocols" not in table  # the method is the run's, not the protocol's
    with open(sweep / "eval_table.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    runs = {r["method"]: r for r in rows.values() if r["method"]}
    assert sorted(runs) == sorted(METHODS)
    params = {m: int(r["trainable_params"]) for m, r in runs.items()}
    assert params["textual_inversion"] < params["lora"] < params["dora"] < params["full"]
    assert all(float(r["weights_mb"]) > 0 and float(r["wall_time_s"]) > 0 for r in runs.values())
    html = (sweep / "report" / "index.html").read_text()
    assert all(m in html for m in METHODS) and "file size (MB)" in html and "peak memory (MB)" in html


def test_generate_puts_every_method_in_the_grid_and_blends_only_adapters(tiny_cfg, tmp_path):
    from ghibli_lab.generate import InputError, generate as generate_grid, grid_tile

    from .conftest import compose_train

    runs = {m: tmp_path / m for m in ("lora", "full", "textual_inversion")}
    for method, run in runs.items():
        train_run(tiny_cfg, run, f"method={method}")
    out = tmp_path / "out"
    cfg = compose_train(
        [f"run={runs['lora']}", "prompt=a red fox", f"loras=[{','.join(map(str, runs.values()))}]", "scheduler.steps=2", "seed=3", f"output_dir={out}"],
        config_name="generate",
    )
    paths = generate_grid(cfg)
    meta = json.loads(paths["grid_json"].read_text())
    assert [(r.get("kind"), r.get("trigger")) for r in meta["rows"][1:]] == [("lora", ""), ("full", ""), ("embeddings", "<ghibli-style> ")]
    # Each row is what the run's weights give on their own, prompted with the run's trigger.
    prompt = meta["columns"][0]["prompt"]
    settings = {k: meta[k] for k in ("scheduler", "steps", "guidance_scale", "resolution")}
    pipe = load_pipeline(load_run_config(runs["full"]).model)
    for row, method in ((2, "full"), (3, "textual_inversion")):
        run_cfg = load_run_config(runs[method])
        with methods.applied(pipe, methods.weights_dir(runs[method], run_cfg)):
            (expected,) = generate(pipe, [methods.prompt_text(run_cfg.method, prompt)], [3], **settings)
        np.testing.assert_array_equal(np.asarray(grid_tile(paths["grid"], row, 0)), np.asarray(expected))
    with pytest.raises(InputError, match="blend mixes LoRA/DoRA adapters"):
        generate_grid(compose_train([f"run={runs['lora']}", "prompt=a fox", f"blend=[{runs['lora']},{runs['textual_inversion']}]",
                                     "blend_weights=[0,1]", f"output_dir={out}"], config_name="generate"))


def test_runs_from_before_the_method_axis_read_as_lora(tmp_path):
    """A .hydra/config.yaml without a method (written before this axis) is a LoRA run: its
    weights are in lora/ and its prompts carry no trigger."""
    old = OmegaConf.create({"model": {"family": "sd15"}, "lora": {"rank": 4}})
    method = methods.run_method(old)
    assert (method.name, method.weights, method.trigger, method.lr) == ("lora", "lora", "", None)
    assert methods.weights_dir(tmp_path, old) == tmp_path / "lora"
