"""The shared latent / text-embedding cache: same training as without it, content-keyed, safe."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ghibli_lab.cache import CachedDataset, encode_records, fingerprint
from ghibli_lab.data import load_records
from ghibli_lab.pipeline import build_tiny_pipeline
from ghibli_lab.step import prepare_for_training
from ghibli_lab.encode import encode_text
from ghibli_lab.train import train


def read_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r], [r["val/loss"] for r in rows if "val/loss" in r]


def test_cached_training_matches_encoding_every_step(tiny_cfg, tmp_path):
    """The cache changes where latents come from, not the training: same losses, same LoRA."""
    cached = train(tiny_cfg("train.cache=true"), tmp_path / "cached")
    direct = train(tiny_cfg("train.cache=false"), tmp_path / "direct")
    assert cached["cache"]["latents"] and cached["cache"]["encoded"] > 0
    assert direct["cache"] == {"latents": False, "text": False, "encoded": 0, "reused": 0}
    (train_c, val_c), (train_d, val_d) = read_losses(tmp_path / "cached"), read_losses(tmp_path / "direct")
    assert train_c == pytest.approx(train_d, rel=1e-4)
    assert val_c == pytest.approx(val_d, rel=1e-4)
    wc = load_file(tmp_path / "cached" / "lora" / "pytorch_lora_weights.safetensors")
    wd = load_file(tmp_path / "direct" / "lora" / "pytorch_lora_weights.safetensors")
    # Batched vs one-at-a-time encoding differs by ~1e-7. Adam's first steps move each weight by
    # about ±lr whatever the gradient's size, so near-zero gradients can flip a step: bound the
    # weight difference by steps x lr (4 x 1e-3), far below the weights' own scale.
    assert all(torch.allclose(wc[k], wd[k], atol=4e-3) for k in wc)
    assert max((wc[k] - wd[k]).abs().max() for k in wc) < 0.01 * max(wc[k].abs().max() for k in wc)


def test_second_run_reuses_every_entry(tiny_cfg, tmp_path):
    first = train(tiny_cfg(), tmp_path / "a")
    second = train(tiny_cfg("lora.rank=8"), tmp_path / "b")  # another adapter, same data and model
    cfg = tiny_cfg()
    records = load_records(cfg.dataset, cfg.cache_dir)
    n, captions = len(records), len({r.caption for r in records})
    # One latent entry per image and one text entry per distinct caption (repeats share one).
    assert first["cache"]["encoded"] == n + captions and first["cache"]["reused"] == n - captions
    assert second["cache"]["encoded"] == 0 and second["cache"]["reused"] == 2 * n


def test_text_encoder_lora_caches_latents_only(tiny_cfg, tmp_path):
    summary = train(tiny_cfg("lora.text_encoder=true"), tmp_path / "run")
    assert summary["cache"]["latents"] and not summary["cache"]["text"]
    assert summary["cache"]["encoded"] == summary["n_train"] + summary["n_holdout"]


def test_random_crop_is_not_cached(tiny_cfg, tmp_path):
    summary = train(tiny_cfg("dataset.center_crop=false"), tmp_path / "run")
    assert summary["cache"]["latents"] is False and summary["cache"]["encoded"] == 0


@pytest.fixture(scope="module")
def tiny_sdxl():
    return build_tiny_pipeline("sdxl")


def test_entries_are_keyed_by_content_and_pair_the_right_caption(tiny_cfg, tmp_path, tiny_sdxl):
    cfg = tiny_cfg()
    records = load_records(cfg.dataset, cfg.cache_dir)[:4]
    fp = fingerprint(cfg.model, torch.float32)
    stats = {"encoded": 0, "reused": 0}
    entries = encode_records(tiny_sdxl, records, cfg.dataset, tmp_path, fp, (False, True), True, stats)
    assert stats == {"encoded": 4 * 2 + 4, "reused": 0}  # two flip variants + one caption each
    dataset = CachedDataset(entries)
    for i, record in enumerate(records):  # shuffling can't mis-pair: each entry is its own record's
        item = dataset[i]
        assert item["key"] == record.key and item["caption"] == record.caption
        embeds, pooled = encode_text(tiny_sdxl, [record.caption])
        assert torch.allclose(item["prompt_embeds"], embeds[0], atol=1e-6)
        assert torch.allclose(item["pooled_prompt_embeds"], pooled[0], atol=1e-6)
    flipped = [load_file(p) for p in entries[0]["latents"]]
    assert not torch.equal(flipped[0]["latent_moments"], flipped[1]["latent_moments"])

    # Changing any part of a key makes new entries; unchanged parts are reused.
    cfg2 = tiny_cfg("dataset.caption_prefix='Still from the Anime, '")
    records2 = load_records(cfg2.dataset, cfg2.cache_dir)[:4]
    stats = {"encoded": 0, "reused": 0}
    encode_records(tiny_sdxl, records2, cfg2.dataset, tmp_path, fp, (False, True), True, stats)
    assert stats == {"encoded": 4, "reused": 8}  # new captions; same images
    stats = {"encoded": 0, "reused": 0}
    encode_records(tiny_sdxl, records, cfg.dataset, tmp_path, fingerprint(cfg.model, torch.bfloat16), (False,), False, stats)
    assert stats == {"encoded": 0, "reused": 4}  # latents don't depend on the training precision (fp32 VAE)
    stats = {"encoded": 0, "reused": 0}
    encode_records(tiny_sdxl, records, cfg.dataset, tmp_path, fingerprint(cfg.model, torch.bfloat16), (False,), True, stats)
    assert stats == {"encoded": 4, "reused": 4}  # text embeddings do: the encoders run in that dtype


def test_cached_latents_are_encoded_in_fp32_whatever_the_training_precision(tiny_cfg, tmp_path):
    """bf16 training keeps the VAE in fp32, so its cached latents are exactly an fp32 pipeline's."""
    cfg = tiny_cfg("train.mixed_precision=bf16")
    records = load_records(cfg.dataset, cfg.cache_dir)[:3]
    reference = build_tiny_pipeline("sdxl")
    bf16 = build_tiny_pipeline("sdxl")
    prepare_for_training(bf16, cfg.train, torch.device("cpu"), torch.bfloat16)
    assert bf16.unet.dtype == torch.bfloat16 and bf16.text_encoder.dtype == torch.bfloat16
    assert bf16.vae.dtype == torch.float32
    stats = {"encoded": 0, "reused": 0}
    a = encode_records(reference, records, cfg.dataset, tmp_path / "a", fingerprint(cfg.model, torch.float32), (False,), False, stats)
    b = encode_records(bf16, records, cfg.dataset, tmp_path / "b", fingerprint(cfg.model, torch.bfloat16), (False,), False, stats)
    for x, y in zip(a, b):
        assert torch.equal(load_file(x["latents"][0])["latent_moments"], load_file(y["latents"][0])["latent_moments"])


def test_damaged_entry_is_re_encoded_and_no_temp_files_remain(tiny_cfg, tmp_path, tiny_sdxl):
    cfg = tiny_cfg()
    records = load_records(cfg.dataset, cfg.cache_dir)[:2]
    fp = fingerprint(cfg.model, torch.float32)
    stats = {"encoded": 0, "reused": 0}
    entries = encode_records(tiny_sdxl, records, cfg.dataset, tmp_path, fp, (False,), False, stats)
    path = entries[0]["latents"][0]
    path.write_bytes(b"not a safetensors file")
    stats = {"encoded": 0, "reused": 0}
    encode_records(tiny_sdxl, records, cfg.dataset, tmp_path, fp, (False,), False, stats)
    assert stats == {"encoded": 1, "reused": 1}
    assert "latent_moments" in load_file(path)
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_entry_with_an_intact_header_and_a_zeroed_payload_is_re_encoded(tiny_cfg, tmp_path, tiny_sdxl):
    """Each entry carries a checksum of its tensors: damage the header can't show is caught."""
    cfg = tiny_cfg()
    records = load_records(cfg.dataset, cfg.cache_dir)[:2]
    fp = fingerprint(cfg.model, torch.float32)
    stats = {"encoded": 0, "reused": 0}
    entries = encode_records(tiny_sdxl, records, cfg.dataset, tmp_path, fp, (False,), False, stats)
    path = entries[0]["latents"][0]
    good = load_file(path)["latent_moments"].clone()  # load_file maps the file: copy before it changes
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header:] = bytes(len(raw) - header)  # zeros where the tensors were; the header still parses
    path.write_bytes(bytes(raw))
    assert torch.count_nonzero(load_file(path)["latent_moments"]) == 0  # safetensors itself can't tell
    stats = {"encoded": 0, "reused": 0}
    encode_records(tiny_sdxl, records, cfg.dataset, tmp_path, fp, (False,), False, stats)
    assert stats == {"encoded": 1, "reused": 1}
    assert torch.equal(load_file(path)["latent_moments"], good)


def test_a_changed_local_model_is_another_cache_entry(tmp_path):
    """Keyed by the weights, not the path: after a local model's VAE file changes, its latents
    are encoded again instead of reused stale."""
    from omegaconf import OmegaConf

    folder = tmp_path / "my-sdxl"
    build_tiny_pipeline("sdxl").save_pretrained(folder)
    model = OmegaConf.create({"family": "sdxl", "pretrained": str(folder), "vae": None, "variant": None})
    before = fingerprint(model, torch.float32)
    assert fingerprint(model, torch.float32) == before
    vae = next(folder.glob("vae/*.safetensors"))
    vae.write_bytes(vae.read_bytes()[:-4] + b"\0\0\0\1")
    assert fingerprint(model, torch.float32) != before
