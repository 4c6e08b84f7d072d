"""The training-step benchmark: bench.json / bench.md on the tiny models, FLOP counting, the
full-size architectures' parameter counts, OOM rows, config checks and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

from ghibli_lab import bench as bench_module
from ghibli_lab.bench import (
    OOM,
    BenchConfigError,
    bench,
    build_setup,
    check_bench_config,
    count_flops,
    peak_bf16_flops,
    slice_batch,
    step_flops,
    step_loss,
)
from ghibli_lab.pipeline import build_full_components

from .conftest import CONF_DIR, ROOT

# Published parameter counts of the full-size components (model cards / config + weights).
FULL_PARAMS = {
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "vae"): 83_653_863,
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,
    ("sd15", "unet"): 859_520_964,
    ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,
}


def compose_bench(*overrides: str) -> DictConfig:
    """The real conf/bench.yaml composed with ``overrides``, as the CLI would."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("bench", overrides=list(overrides))


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = compose_bench("size=tiny", "batch_sizes=[1,2]", "warmup=1", "steps=2")
    return out, bench(cfg, out)


def test_tiny_bench_writes_one_row_per_config(tiny_run):
    """Both models x (reference: 2 batch sizes; fast: 2 batch sizes x with/without checkpointing),
    each with a positive throughput and FLOP count; no MFU or peak memory on a CPU; speedups."""
    out, result = tiny_run
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    rows = on_disk["rows"]
    keys = [(r["model"], r["mode"], r["batch_size"], r["gradient_checkpointing"]) for r in rows]
    expected = [(m, "reference", bs, False) for m in ("sdxl", "sd15") for bs in (1, 2)]
    expected += [(m, "fast", bs, ck) for m in ("sdxl", "sd15") for bs in (1, 2) for ck in (False, True)]
    assert sorted(keys) == sorted(expected)
    for r in rows:
        assert r["error"] is None, r
        assert r["images_per_s"] > 0 and r["step_ms"] > 0
        assert r["flops_per_step"] > 0
        assert r["loss"] == r["loss"]  # finite: not NaN
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # CPU
        assert r["compile"] is False
    assert on_disk["speedup"].keys() == {"sdxl", "sd15"}
    for per_bs in on_disk["speedup"].values():
        assert per_bs.keys() == {"1", "2"} and all(v > 0 for v in per_bs.values())
    assert on_disk["size"] == "tiny" and on_disk["device"].startswith("CPU")
    assert {"torch", "diffusers", "transformers", "peft"} <= on_disk["versions"].keys()

    md = (out / "bench.md").read_text()
    assert "| sdxl | fast | 2 | yes |" in md and "| sd15 | reference | 1 | no |" in md
    assert "Speedup" in md and on_disk["device"] in md and "torch 2." in md


def test_fast_rows_use_the_cache_and_fewer_flops(tiny_run):
    """Fast steps skip the VAE and text encoders, so they do fewer FLOPs than the reference's;
    checkpointing doesn't change the (model) FLOP count."""
    _, result = tiny_run
    flops = {
        (r["model"], r["mode"], r["batch_size"], r["gradient_checkpointing"]): r["flops_per_step"] for r in result["rows"]
    }
    for model in ("sdxl", "sd15"):
        assert flops[(model, "fast", 1, False)] < flops[(model, "reference", 1, False)]
        assert flops[(model, "fast", 2, True)] == flops[(model, "fast", 2, False)]


def test_step_flops_count_forward_and_backward_and_scale_with_batch():
    cfg = compose_bench("size=tiny", "batch_sizes=[2]")
    setup = build_setup(cfg, "sdxl", "fast", torch.device("cpu"))
    assert "latent_moments" in setup.batch and "pixel_values" not in setup.batch
    one, two = step_flops(setup, 1), step_flops(setup, 2)
    assert one > 0
    assert abs(two / (2 * one) - 1) < 0.10
    with torch.no_grad():
        forward = count_flops(lambda: step_loss(setup, slice_batch(setup.batch, 1)))
    # Frozen weights: backward needs input gradients (about one forward) but no weight gradients,
    # plus attention's backward at twice its forward; so a step is a little over 2 forwards.
    assert 1.8 * forward < one < 3.2 * forward
    assert all(p.grad is None for p in setup.params)  # counting leaves no gradients behind


def test_full_size_architectures_have_the_published_parameter_counts():
    """Shapes only (meta device, no memory): every full-size component's parameter count."""
    for family in ("sdxl", "sd15"):
        components = build_full_components(family, "meta")
        for name, module in components.items():
            if isinstance(module, torch.nn.Module):
                assert n_params(module) == FULL_PARAMS[(family, name)], (family, name)
        assert components["vae"].config.scaling_factor == {"sdxl": 0.13025, "sd15": 0.18215}[family]
        assert len(components["tokenizer"]) <= components["text_encoder"].config.vocab_size


def test_oom_row_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real = bench_module.measure

    def measure(setup, batch_size, checkpointing, cfg):
        if batch_size == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(setup, batch_size, checkpointing, cfg)

    monkeypatch.setattr(bench_module, "measure", measure)
    cfg = compose_bench(
        "size=tiny", "models=[sd15]", "modes=[fast]", "batch_sizes=[2,1]", "gradient_checkpointing=[true]",
        "warmup=0", "steps=1",
    )
    result = bench(cfg, tmp_path)
    by_bs = {r["batch_size"]: r for r in result["rows"]}
    assert by_bs[2]["error"] == OOM and by_bs[2]["images_per_s"] is None and by_bs[2]["flops_per_step"] is None
    assert by_bs[1]["error"] is None and by_bs[1]["images_per_s"] > 0
    assert result["speedup"] == {"sd15": {"2": None, "1": None}}  # no reference rows to compare with
    assert "| sd15 | fast | 2 | yes | no | - |" in (tmp_path / "bench.md").read_text()
    assert "out of memory" in (tmp_path / "bench.md").read_text()


def test_config_is_checked():
    with pytest.raises(ConfigCompositionException):
        compose_bench("steps=ten")  # typed by the schema
    with pytest.raises(ConfigCompositionException):
        compose_bench("batchsizes=[1]")  # unknown key
    cfg = compose_bench("modes=[reference,turbo]", "batch_sizes=[0]", "resolution.sdxl=1020")
    with pytest.raises(BenchConfigError) as err:
        check_bench_config(cfg, torch.device("cuda"))
    assert "modes" in str(err.value) and "batch_sizes" in str(err.value) and "resolution.sdxl" in str(err.value)


def test_full_size_on_cpu_is_refused_with_a_way_out():
    cfg = compose_bench()
    assert cfg.size == "full" and list(cfg.batch_sizes) == [1, 4, 8] and cfg.resolution.sdxl == 1024
    with pytest.raises(BenchConfigError, match="allow_cpu_full=true"):
        check_bench_config(cfg, torch.device("cpu"))
    check_bench_config(compose_bench("allow_cpu_full=true"), torch.device("cpu"))
    check_bench_config(cfg, torch.device("cuda"))


def test_peak_table_is_dense_bf16_and_unknown_devices_get_none():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert peak_bf16_flops("NVIDIA H200")[0] == 989e12
    assert peak_bf16_flops("NVIDIA GH200 480GB")[0] == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert peak_bf16_flops("NVIDIA L40S")[0] == 362e12
    assert peak_bf16_flops("NVIDIA GeForce RTX 4090")[0] == 165e12
    assert peak_bf16_flops("NVIDIA L40")[0] is None
    assert peak_bf16_flops("Tesla T4")[0] is None


def test_cli_prints_the_path_of_bench_json(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ghibli_lab.bench", "size=tiny", "batch_sizes=[1]", "steps=1", "warmup=0",
         f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path == run_dir / "bench.json" and path.is_file()
    assert len(json.loads(path.read_text())["rows"]) == 2 * (1 + 2)
    assert (run_dir / "bench.md").is_file() and not (run_dir / ".hydra").exists()


@pytest.mark.gpu
def test_full_sdxl_unet_builds_on_the_gpu_with_the_published_size():
    unet = build_full_components("sdxl", "cuda", torch.bfloat16)["unet"]
    assert n_params(unet) == FULL_PARAMS[("sdxl", "unet")]  # 2.567B
    assert next(unet.parameters()).device.type == "cuda" and unet.dtype == torch.bfloat16


@pytest.mark.gpu
def test_full_sd15_bench_on_the_gpu(tmp_path):
    """One short full-size SD 1.5 run: peak memory measured, MFU where the GPU's peak is known."""
    cfg = compose_bench("models=[sd15]", "batch_sizes=[1]", "warmup=2", "steps=2", "gradient_checkpointing=[true]")
    result = bench(cfg, tmp_path)
    for r in result["rows"]:
        assert r["error"] is None, r
        assert r["peak_mem_gib"] > 0 and r["flops_per_step"] > 1e12
        assert isinstance(r["host_syncs_per_step"], int)
        assert (r["mfu"] is None) == (result["peak_bf16_flops"] is None)
    assert result["speedup"]["sd15"]["1"] > 0
