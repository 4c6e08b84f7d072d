"""Generation from trained LoRAs: the grid's layout, run dirs and kohya files, and blending."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from ghibli_lab.generate import InputError, generate, grid_tile
from ghibli_lab.adapters import KOHYA_FILE
from ghibli_lab.train import train

from .conftest import compose_train

PROMPTS = ["a red fox", "a blue lake"]
FAST = ["scheduler.steps=2", "seed=3"]



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained runs (alpha 4 and 8), laid out as `train` leaves them."""
    root = tmp_path_factory.mktemp("runs")
    out = []
    for i, alpha in enumerate([4, 8]):
        cfg = compose_train(
            [
                "experiment=demo",
                "logger=none",
                "lora.rank=4",
                f"lora.alpha={alpha}",
                "train.max_steps=3",
                "train.val_every=0",
                "train.checkpoint_every=0",
                "dataset.num_images=12",
                "dataset.caption_prefix='ghibli style, '",
                "scheduler.steps=2",
                "sample.seeds=[0]",
                "sample.prompts=[a hill]",
                f"cache_dir={root / 'cache'}",
            ]
        )
        run = root / f"{i}_lora.alpha-{alpha}"
        train(cfg, run)
        (run / ".hydra").mkdir()
        OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
        out.append(run)
    return out


def compose_generate(*overrides: str):
    """conf/generate.yaml composed with ``overrides``, as the CLI would."""
    return compose_train(list(overrides), config_name="generate")


def tile(path, row: int, column: int) -> np.ndarray:
    return np.asarray(grid_tile(path, row, column)).astype(np.int16)


def test_grid_has_a_base_row_and_one_row_per_lora(runs, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# comment lines and blank lines are skipped\n\n" + "\n".join(PROMPTS) + "\n")
    loras = ",".join(str(r) for r in runs)
    paths = generate(
        compose_generate(
            "prompt=a castle", f"prompts_file={prompts_file}", f"loras=[{loras}]", *FAST, f"output_dir={tmp_path / 'out'}"
        )
    )
    meta = json.loads(paths["grid_json"].read_text())
    assert [c["prompt"] for c in meta["columns"]] == ["a castle", *PROMPTS]  # no run=: no caption prefix
    assert [r["label"] for r in meta["rows"]] == ["base", "LoRA 1", "LoRA 2"]
    assert [r["name"] for r in meta["rows"][1:]] == [r.name for r in runs]
    assert meta["tile"] == [64, 64] and meta["resolution"] == 64  # the tiny model's default
    image = Image.open(paths["grid"])
    assert image.size == (meta["label_width"] + 64 * 3, 64 * 3)  # columns = prompts, rows = 1 + LoRAs
    assert meta["label_width"] == 60
    for column in range(3):
        base, a, b = (tile(paths["grid"], row, column) for row in range(3))
        assert np.abs(a - base).mean() > 1 and np.abs(b - a).mean() > 1  # each row its own model
    assert "blend" not in paths


def test_from_a_run_dir_and_from_its_kohya_file(runs, tmp_path):
    """run= takes the run's model, resolution, caption prefix and LoRA; its kohya file loads to the
    same image as its diffusers file."""
    run = runs[0]
    from_run = generate(compose_generate(f"run={run}", f"prompt={PROMPTS[0]}", *FAST, f"output_dir={tmp_path / 'a'}"))
    meta = json.loads(from_run["grid_json"].read_text())
    assert meta["columns"] == [{"prompt": "ghibli style, " + PROMPTS[0], "seed": 3}]
    assert [r["name"] for r in meta["rows"][1:]] == [run.name]
    assert meta["model"]["family"] == "sdxl" and meta["model"]["pretrained"] == "tiny"

    kohya = generate(
        compose_generate(
            f"run={run}", f"loras=[{run / 'lora' / KOHYA_FILE}]", f"prompt={PROMPTS[0]}", *FAST,
            f"output_dir={tmp_path / 'k'}",
        )
    )
    assert Image.open(kohya["grid"]).size == Image.open(from_run["grid"]).size
    np.testing.assert_array_equal(tile(kohya["grid"], 0, 0), tile(from_run["grid"], 0, 0))  # same base
    np.testing.assert_array_equal(tile(kohya["grid"], 1, 0), tile(from_run["grid"], 1, 0))
    assert np.abs(tile(kohya["grid"], 1, 0) - tile(kohya["grid"], 0, 0)).mean() > 1


def test_blend_endpoints_reproduce_each_lora_alone(runs, tmp_path):
    a, b = runs
    alone = [
        generate(compose_generate(f"loras=[{r}]", f"prompt={PROMPTS[1]}", *FAST, f"output_dir={tmp_path / f'alone{i}'}"))
        for i, r in enumerate(runs)
    ]
    blended = generate(
        compose_generate(
            f"blend=[{a},{b}]", "blend_weights=[0,0.5,1]", f"prompt={PROMPTS[1]}", *FAST,
            f"output_dir={tmp_path / 'blend'}",
        )
    )
    meta = json.loads(blended["blend_json"].read_text())
    assert [c["w"] for c in meta["columns"]] == [0, 0.5, 1]
    assert [(c["weight_a"], c["weight_b"]) for c in meta["columns"]] == [(1, 0), (0.5, 0.5), (0, 1)]
    assert Image.open(blended["blend"]).size == (meta["label_width"] + 64 * 3, 64)  # one row per prompt
    start, middle, end = (tile(blended["blend"], 0, j) for j in range(3))
    np.testing.assert_array_equal(start, tile(alone[0]["grid"], 1, 0))  # weights [1, 0]: a exactly
    np.testing.assert_array_equal(end, tile(alone[1]["grid"], 1, 0))  # weights [0, 1]: b exactly
    assert np.abs(middle - start).mean() > 0.5 and np.abs(middle - end).mean() > 0.5
    np.testing.assert_array_equal(tile(blended["grid"], 0, 0), tile(alone[0]["grid"], 0, 0))  # base row


def test_bad_input_is_one_clear_error(runs, tmp_path):
    with pytest.raises(InputError, match="no prompt"):
        generate(compose_generate(f"output_dir={tmp_path / 'x'}"))
    with pytest.raises(InputError, match="exactly two"):
        generate(compose_generate("prompt=a", f"blend=[{runs[0]}]", f"output_dir={tmp_path / 'x'}"))
    with pytest.raises(InputError, match="not a training run dir"):
        generate(compose_generate("prompt=a", f"run={tmp_path}", f"output_dir={tmp_path / 'x'}"))

    missing = tmp_path / "nope.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "ghibli_lab.generate", "prompt=a fox", f"loras=[{missing}]", f"output_dir={tmp_path / 'cli'}"],
        cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert f"no LoRA file at {missing}" in proc.stderr
    assert "Traceback" not in proc.stderr  # one message, not a stack trace
