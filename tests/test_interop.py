"""The exported LoRA files as other tools read them: text-encoder keys in CLIP's text_model layout,
adapter metadata older PEFT accepts, permissions a server running as another user can read,
the configured dtype, and the same bytes for the same weights."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from safetensors import safe_open
from safetensors.torch import load_file

from ghibli_lab.adapters import DIFFUSERS_FILE, KOHYA_FILE, METADATA_FIELDS, attach_lora, save_lora
from ghibli_lab.config import LoraConfig
from ghibli_lab.pipeline import build_tiny_pipeline
from ghibli_lab.train import train

from .conftest import group_option

SAVE = """
import sys, torch
from omegaconf import OmegaConf
from ghibli_lab.adapters import attach_lora, save_lora
from ghibli_lab.pipeline import build_tiny_pipeline
torch.manual_seed(0)
pipe = build_tiny_pipeline("sdxl")
attach_lora(pipe, OmegaConf.merge(OmegaConf.load("conf/lora/r8a8.yaml"), {"text_encoder": True}))
with torch.no_grad():
    for p in pipe.unet.parameters():
        if p.requires_grad:
            p.add_(0.01)
save_lora(pipe, sys.argv[1])
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    pipe = build_tiny_pipeline("sdxl")
    attach_lora(pipe, group_option(LoraConfig, "lora", "r8a8", text_encoder=True))
    old = os.umask(0o022)
    try:
        paths = save_lora(pipe, out)
    finally:
        os.umask(old)
    return paths


def test_text_encoder_keys_use_the_text_model_layout(saved):
    keys = list(load_file(saved["diffusers"]))
    te = [k for k in keys if k.startswith(("text_encoder.", "text_encoder_2."))]
    assert te and all(k.split(".", 1)[1].startswith("text_model.encoder.layers.") for k in te), te[:3]


def test_adapter_metadata_has_only_the_fields_a_loader_needs(saved):
    import json

    with safe_open(saved["diffusers"], "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    for name in ("unet", "text_encoder", "text_encoder_2"):  # diffusers flattens them as <component>.<field>
        fields = {k.split(".", 1)[1]: v for k, v in metadata.items() if k.startswith(f"{name}.")}
        assert fields and set(fields) <= set(METADATA_FIELDS)
        PeftLoraConfig(**fields)  # builds a LoraConfig as diffusers does on load


def test_files_are_readable_as_the_umask_allows(saved):
    for path in saved.values():
        assert path.stat().st_mode & 0o777 == 0o644  # umask 022: not safetensors' 0600


def test_save_dtype_sets_the_exported_dtype(tmp_path, tiny_cfg):
    for dtype, expected in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        run = tmp_path / dtype
        train(tiny_cfg("train.max_steps=1", f"lora.save_dtype={dtype}"), run)
        for name in (DIFFUSERS_FILE, KOHYA_FILE):
            assert {v.dtype for v in load_file(run / "lora" / name).values()} == {expected}, (dtype, name)


def test_the_same_weights_give_the_same_bytes_in_another_process(tmp_path):
    """safetensors writes its metadata from a hash map, in another order in each process."""
    root = Path(__file__).resolve().parents[1]
    digests = []
    for i in range(2):
        out = tmp_path / str(i)
        subprocess.run([sys.executable, "-c", SAVE, str(out)], cwd=root, check=True, capture_output=True, timeout=300)
        digests.append({n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in (DIFFUSERS_FILE, KOHYA_FILE)})
    assert digests[0] == digests[1]


def test_no_import_or_loading_noise(tmp_path):
    """The two warnings users saw on every command: transformers' 'requires torchvision ...
    falling back', and diffusers' 'No LoRA keys associated ... open an issue' for a UNet-only LoRA."""
    script = """
import sys
from omegaconf import OmegaConf
from ghibli_lab.adapters import attach_lora, load_lora, save_lora
from ghibli_lab.pipeline import build_tiny_pipeline
pipe = build_tiny_pipeline("sdxl")
attach_lora(pipe, OmegaConf.load("conf/lora/r8a8.yaml"))
save_lora(pipe, sys.argv[1])
fresh = build_tiny_pipeline("sdxl")
load_lora(fresh, sys.argv[1])
print("loaded")
"""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-2000:]
    assert "requires torchvision" not in proc.stderr and "No LoRA keys associated" not in proc.stderr, proc.stderr
