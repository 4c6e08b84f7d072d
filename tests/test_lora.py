"""LoRA attach / save / load on the tiny SD 1.5 and SDXL pipelines (real diffusers + PEFT)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ghibli_lab.config import LoraConfig
from ghibli_lab.adapters import DIFFUSERS_FILE, KOHYA_FILE, adapted_models, attach_lora, load_lora, save_lora
from ghibli_lab.pipeline import build_tiny_pipeline

from .conftest import group_option

RANK, ALPHA = 4, 16  # alpha != rank on purpose: a loader that ignores alpha gives another image
PROMPT = "a watercolor hill"



def lora_cfg(**overrides):
    """A full LoraConfig (the schema's keys) as the trainer receives it."""
    fields = {"rank": RANK, "alpha": ALPHA, "text_encoder": True, **overrides}
    return group_option(LoraConfig, "lora", "r8a8", **fields)


def generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def perturb(pipe, seed=1, scale=0.3):
    """Deterministically set every LoRA weight (B starts at zero, so the adapter is a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in adapted_models(pipe).values():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=g) * scale)


def assert_same_image(a, b):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def assert_different_image(a, b):
    assert np.abs(a - b).max() > 0.05


# Attention only (the default), and attention plus convolutions, projections and feed-forwards:
# a diffusers-format file mixing both once reloaded with every attention weight silently dropped.
WIDE = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


@pytest.fixture(scope="module", params=[("sd15", None), ("sdxl", None), ("sd15", "wide"), ("sdxl", "wide")])
def trained(request, tmp_path_factory):
    """A tiny pipeline with a perturbed rank-4 / alpha-16 adapter (UNet and text encoders), saved."""
    family, targets = request.param
    pipe = build_tiny_pipeline(family)
    base = generate(pipe)
    attach_lora(pipe, lora_cfg(**({"target_modules": WIDE} if targets else {})))
    untrained = generate(pipe)
    perturb(pipe)
    image = generate(pipe)
    out_dir = tmp_path_factory.mktemp(f"lora_{family}_{targets}")
    paths = save_lora(pipe, out_dir)
    return {"family": family, "base": base, "untrained": untrained, "image": image, "paths": paths, "dir": out_dir}


def test_untrained_adapter_is_a_no_op_and_trained_one_changes_the_image(trained):
    """Freshly attached LoRA leaves the base model's output unchanged; changed weights change it."""
    assert_same_image(trained["untrained"], trained["base"])
    assert_different_image(trained["image"], trained["base"])


def test_save_lora_writes_both_files(trained):
    paths = trained["paths"]
    assert paths == {"diffusers": trained["dir"] / DIFFUSERS_FILE, "kohya": trained["dir"] / KOHYA_FILE}
    assert all(p.is_file() for p in paths.values())


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_saved_lora_reloads_into_a_fresh_pipeline_to_the_same_image(trained, kind):
    """Either file, loaded into the base model, reproduces the trained pipeline's image exactly."""
    fresh = build_tiny_pipeline(trained["family"])
    load_lora(fresh, trained["paths"][kind])
    image = generate(fresh)
    assert_same_image(image, trained["image"])
    assert_different_image(image, trained["base"])


def test_load_lora_accepts_the_run_directory(trained):
    """A run's lora/ directory loads as its diffusers file."""
    fresh = build_tiny_pipeline(trained["family"])
    load_lora(fresh, trained["dir"])
    assert_same_image(generate(fresh), trained["image"])


def test_diffusers_file_without_alpha_metadata_would_differ(trained, tmp_path):
    """The adapter metadata (alpha) in the diffusers file matters: without it diffusers reloads
    with alpha = rank, another adapter. Guards against save_lora dropping the metadata."""
    with safe_open(trained["paths"]["diffusers"], "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    components = ["unet", "text_encoder"] + (["text_encoder_2"] if trained["family"] == "sdxl" else [])
    for name in components:
        assert metadata[f"{name}.lora_alpha"] == ALPHA
        assert metadata[f"{name}.r"] == RANK

    stripped = tmp_path / DIFFUSERS_FILE
    save_file(load_file(trained["paths"]["diffusers"]), stripped, metadata={"format": "pt"})
    fresh = build_tiny_pipeline(trained["family"])
    load_lora(fresh, stripped)
    assert_different_image(generate(fresh), trained["image"])


def test_kohya_file_layout_and_alpha(trained):
    """Kohya keys as ComfyUI/A1111 expect them, with the configured alpha (16), not the rank."""
    with safe_open(trained["paths"]["kohya"], "pt") as f:
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
        metadata = f.metadata()
    prefixes = {"sd15": ("lora_unet_", "lora_te_"), "sdxl": ("lora_unet_", "lora_te1_", "lora_te2_")}
    expected_prefixes = prefixes[trained["family"]]
    for prefix in expected_prefixes:
        assert any(k.startswith(prefix) for k in keys), prefix
    assert all(k.startswith(expected_prefixes) for k in keys)

    modules = {k.split(".", 1)[0] for k in keys}
    assert set(keys) == {
        f"{m}.{suffix}" for m in modules for suffix in ("alpha", "lora_down.weight", "lora_up.weight")
    }
    te_modules = [m for m in modules if m.startswith("lora_te")]
    assert te_modules and all("_text_model_encoder_layers_" in m for m in te_modules)
    assert any(m.startswith("lora_unet_") and m.endswith("_to_q") for m in modules)

    for m in modules:
        assert tensors[f"{m}.alpha"].item() == float(ALPHA)
        assert tensors[f"{m}.lora_down.weight"].shape[0] == RANK
        assert tensors[f"{m}.lora_up.weight"].shape[1] == RANK
        assert tensors[f"{m}.lora_up.weight"].dtype == torch.float32

    assert metadata["ss_network_dim"] == str(RANK)
    assert metadata["ss_network_alpha"] == "16.0"
    assert metadata["ss_network_module"] == "networks.lora"
    version = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[trained["family"]]
    assert metadata["ss_base_model_version"] == version


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_attach_lora_returns_only_trainable_lora_params(family):
    """The optimizer gets exactly the LoRA weights; every base weight is frozen."""
    pipe = build_tiny_pipeline(family)
    params = attach_lora(pipe, lora_cfg())
    models = adapted_models(pipe)
    expected = ["unet", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    assert sorted(models) == sorted(expected)

    returned = {id(p) for p in params}
    assert len(returned) == len(params) > 0
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, param in model.named_parameters():
            is_lora = "lora_" in name
            assert param.requires_grad == is_lora, name
            assert (id(param) in returned) == is_lora, name
    lora_a = [p for m in models.values() for n, p in m.named_parameters() if "lora_A" in n]
    assert lora_a and all(p.shape[0] == RANK for p in lora_a)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_without_text_encoder_only_the_unet_is_adapted(family):
    pipe = build_tiny_pipeline(family)
    params = attach_lora(pipe, lora_cfg(text_encoder=False))
    assert list(adapted_models(pipe)) == ["unet"]
    unet_lora = {id(p) for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert {id(p) for p in params} == unet_lora
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())


def test_sd15_save_without_text_encoder_has_unet_keys_only(tmp_path):
    """A UNet-only adapter writes no text-encoder keys in either file, and reloads."""
    pipe = build_tiny_pipeline("sd15")
    attach_lora(pipe, lora_cfg(text_encoder=False))
    perturb(pipe, seed=3)
    paths = save_lora(pipe, tmp_path)
    assert all(k.startswith("lora_unet_") for k in load_file(paths["kohya"]))
    assert all(k.startswith("unet.") for k in load_file(paths["diffusers"]))


def test_load_lora_missing_file_raises(tmp_path):
    pipe = build_tiny_pipeline("sd15")
    with pytest.raises(FileNotFoundError, match="no LoRA file"):
        load_lora(pipe, tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError, match="no LoRA file"):
        load_lora(pipe, tmp_path)  # a directory without pytorch_lora_weights.safetensors
