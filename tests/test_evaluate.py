"""Held-out evaluation: per-run metrics with their protocol, the sweep table, the base cache."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ghibli_lab.evaluate import METRIC_KEYS, evaluate
from ghibli_lab.train import train

from .conftest import compose_train, wandb_offline_runs

EVAL_ARGS = ["eval.features=tiny", "eval.steps=2", "eval.images_per_prompt=2", "eval.kid_subset_size=1000"]


def compose_eval(*overrides: str):
    return compose_train(list(overrides), config_name="evaluate")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two tiny trained runs laid out as a Hydra sweep dir (as `train -m` leaves it)."""
    root = tmp_path_factory.mktemp("sweep")
    for i, alpha in enumerate([4, 8]):
        cfg = compose_train(
            [
                "experiment=demo",
                "logger=wandb",
                "logger.mode=offline",
                f"lora.alpha={alpha}",
                "lora.rank=4",
                "train.max_steps=3",
                "train.val_every=3",
                "train.checkpoint_every=0",
                "dataset.num_images=20",
                "scheduler.steps=2",
                "sample.seeds=[0]",
                f"cache_dir={root / 'cache'}",
            ]
        )
        run = root / f"{i}_lora.alpha-{alpha}"
        train(cfg, run)
        (run / ".hydra").mkdir()
        OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return root


def test_every_run_gets_metrics_with_protocol_and_the_sweep_a_table(sweep):
    results = evaluate(compose_eval(f"run_dir={sweep}", *EVAL_ARGS))
    assert len(results) == 2
    for run in ("0_lora.alpha-4", "1_lora.alpha-8"):
        m = json.loads((sweep / run / "eval" / "metrics.json").read_text())
        for side in ("lora", "base"):
            assert set(m[side]) == set(METRIC_KEYS)
            assert all(isinstance(m[side][k], float) for k in METRIC_KEYS)
        p = m["protocol"]
        summary = json.loads((sweep / run / "summary.json").read_text())
        assert p["n_real"] == summary["n_holdout"] == 2  # the training run's own held-out split
        # The LoRA evaluated is the one trained: its val loss reproduces the training summary's
        # (for every run, not only the first one the pipeline saw).
        assert m["lora"]["val_loss"] == pytest.approx(summary["val/loss"], rel=1e-5)
        assert m["base"]["val_loss"] == pytest.approx(summary["val/loss_initial"], rel=1e-5)
        assert m["lora"]["val_loss"] != m["base"]["val_loss"]
        assert p["n_fake"] == 2 * p["n_real"]
        assert p["kid_subset_size"] == 2 and p["kid_subset_clamped"] is True
        assert "2048" in p["fid_warning"]
        assert p["seed"] == 0 and p["images_per_prompt"] == 2 and p["scheduler"] == "ddim" and p["steps"] == 2
        # Every generated image has its own seed; the base set was generated from the same ones.
        done = json.loads((Path(p["base_images"]) / "done").read_text())
        assert done["seeds"] == [[0, 1], [2, 3]]
        assert {"kid_subsets", "kid_kernel", "device", "dtype", "lora_scale", "clip_text", "base_images_status"} <= set(p)
        assert p["lora_scale"] == summary["lora/scale"]
        # LoRA - base with a 95% interval for every metric in the table.
        assert set(m["paired"]) == {"kid", "fid", "cmmd", "clip_score", "diversity", "val_loss"}
        for d in m["paired"].values():
            assert d["low"] <= d["high"] and isinstance(d["better"], bool) and isinstance(d["worse"], bool)
        assert m["paired"]["val_loss"]["diff"] == pytest.approx(m["lora"]["val_loss"] - m["base"]["val_loss"])
        assert p["feature_models"]["image_features"]["sha256"]
        assert {"torch", "diffusers", "torchmetrics"} <= set(p["versions"])
        assert len(list((sweep / run / "eval" / "images" / "lora").glob("*.png"))) == p["n_fake"]

    rows = list(csv.DictReader(open(sweep / "eval_table.csv")))
    assert [r["run"] for r in rows].count("base model") == 1 and len(rows) == 3
    kids = [float(r["kid"]) for r in rows]
    assert kids == sorted(kids)
    table = (sweep / "eval_table.md").read_text()
    assert "| run | method | N | kid |" in table and "clamped to N" in table
    assert "| run | method | trainable params | file size (MB) |" in table  # what each run cost
    assert "| 2 vs 2 |" not in table and "| 4 vs 2 |" in table  # each row's N: generated vs held out
    assert "LoRA − base, 95% paired bootstrap interval" in table
    assert "kid_diff_low" in rows[0] and rows[0]["features"] == "tiny"  # the csv carries intervals and protocol


def test_base_images_are_generated_once_per_sweep_and_reused(sweep):
    evaluate(compose_eval(f"run_dir={sweep}", *EVAL_ARGS))
    base_dirs = list((sweep / "cache" / "eval_base").iterdir())
    assert len(base_dirs) == 1  # both runs share one model, split and sampling settings
    stamp = (base_dirs[0] / "0000.png").stat().st_mtime_ns
    first = [json.loads((sweep / r / "eval" / "metrics.json").read_text()) for r in ("0_lora.alpha-4", "1_lora.alpha-8")]
    assert first[0]["base"] == first[1]["base"]  # same base images, same seeded KID subsets
    assert first[1]["protocol"]["base_images_status"] == "reused"
    assert len(list((base_dirs[0] / "real").glob("*.png"))) == first[0]["protocol"]["n_real"]  # for the report
    evaluate(compose_eval(f"run_dir={sweep}", *EVAL_ARGS))
    assert (base_dirs[0] / "0000.png").stat().st_mtime_ns == stamp  # reused, not regenerated
    # Other sampling settings are another cache entry.
    evaluate(compose_eval(f"run_dir={sweep / '0_lora.alpha-4'}", *EVAL_ARGS, "eval.scheduler=ddpm"))
    assert len(list((sweep / "cache" / "eval_base").iterdir())) == 2


def test_evaluation_is_its_own_wandb_run_in_the_training_runs_group(sweep):
    """The run trained with W&B offline; its evaluation is a W&B run of job type eval in the same
    group, holding eval/* and a pointer to the training run, which is never reopened."""
    evaluate(compose_eval(f"run_dir={sweep / '1_lora.alpha-8'}", *EVAL_ARGS))
    ident = json.loads((sweep / "1_lora.alpha-8" / "summary.json").read_text())["wandb"]
    offline = wandb_offline_runs(sweep / "1_lora.alpha-8" / "wandb")
    assert [r["id"] for r in offline].count(ident["id"]) == 1  # only the training run has that id
    evals = [r for r in offline if r["job_type"] == "eval"]
    assert evals and all(r["group"] == ident["group"] and "train_run_id" in r["config"] for r in evals)
    assert {"eval/kid", "eval/base_kid", "eval/kid_diff_low", "eval/kid_diff_high"} <= evals[-1]["summary"]


def run_evaluate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ghibli_lab.evaluate", *args],
        cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=600,
    )


def test_sampling_settings_sweep_with_multirun(sweep, tmp_path):
    run = sweep / "0_lora.alpha-4"
    proc = run_evaluate(
        "-m", f"run_dir={run}", "eval.features=tiny", "eval.steps=2", "eval.images_per_prompt=1",
        "eval.scheduler=ddpm,ddim", "guidance.scale=1,7.5", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for scheduler, scale in [("ddpm", 1), ("ddim", 7.5)]:
        m = json.loads((run / "eval" / f"eval.scheduler-{scheduler}_guidance.scale-{scale}" / "metrics.json").read_text())
        assert (m["protocol"]["scheduler"], m["protocol"]["guidance_scale"]) == (scheduler, scale)
    assert (run / ".hydra" / "config.yaml").read_text().count("lora:") == 1  # training config untouched


def test_inception_offline_and_missing_fails_with_one_clear_message(sweep, tmp_path):
    proc = run_evaluate(
        f"run_dir={sweep / '0_lora.alpha-4'}", "eval.features=inception", f"cache_dir={tmp_path / 'empty'}", cwd=tmp_path
    )
    assert proc.returncode != 0
    assert "inception-2015-12-05.pt" in proc.stderr
    assert str(tmp_path / "empty" / "features") in proc.stderr
    assert "Traceback" not in proc.stderr  # one message, not a stack trace


def test_default_gives_one_independent_image_per_held_out_caption(sweep):
    run = sweep / "0_lora.alpha-4"
    (result,) = evaluate(compose_eval(f"run_dir={run}", "eval.features=tiny", "eval.steps=2"))
    p = result["protocol"]
    assert p["images_per_prompt"] == 1 and p["n_fake"] == p["n_real"]
    assert result["lora"]["diversity"] is None  # within-prompt diversity needs 2 images per caption


def test_a_changed_local_model_dir_invalidates_the_base_image_cache(tmp_path):
    """Base images are keyed by the model's weights, not its path: rewriting a file changes the key."""
    from ghibli_lab.evaluate import cache_key
    from ghibli_lab.hub import model_fingerprint
    from ghibli_lab.pipeline import build_tiny_pipeline

    folder = tmp_path / "my-model"
    build_tiny_pipeline("sd15").save_pretrained(folder)
    model = OmegaConf.create({"family": "sd15", "pretrained": str(folder), "vae": None, "variant": None})
    settings = {"scheduler": "ddim", "steps": 2, "guidance_scale": 7.5, "resolution": 64}
    key = lambda: cache_key(model_fingerprint(model), [], settings, [[0]])  # noqa: E731
    first = key()
    assert key() == first  # nothing changed: the same entry
    weights = next(folder.glob("vae/*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")  # same size, new content and mtime
    assert key() != first


def test_re_evaluating_with_fewer_images_per_caption_replaces_the_old_images(sweep):
    run = sweep / "0_lora.alpha-4"
    evaluate(compose_eval(f"run_dir={run}", "eval.features=tiny", "eval.steps=1", "eval.images_per_prompt=3"))
    (result,) = evaluate(compose_eval(f"run_dir={run}", "eval.features=tiny", "eval.steps=1", "eval.images_per_prompt=1"))
    assert len(list((run / "eval" / "images" / "lora").glob("*.png"))) == result["protocol"]["n_fake"] == 2
