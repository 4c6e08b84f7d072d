"""Data preflight (ghibli_lab.data.preflight): bad files are skipped and reported, never touched."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from PIL import Image, ImageFile

from ghibli_lab.config import DatasetConfig
from ghibli_lab.data import (
    IMAGE_EXTENSIONS,
    SMALL_POLICY,
    PreflightError,
    Record,
    caption_length_report,
    load_image,
    load_records,
    preflight,
    prepare_image,
    write_data_report,
)

from .conftest import group_option

RES = 64
TRUNCATED = "truncated image"
NOT_AN_IMAGE = "not an image (cannot identify image file)"


def make_cfg(path, **overrides):
    fields = {"name": "test", "source": "folder", "path": str(path), "resolution": RES, **overrides}
    return group_option(DatasetConfig, "dataset", "folder", **fields)


def noise(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Random pixels: incompressible, so a cut file always loses pixel data."""
    rgb = Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def check_trainable(record: Record, resolution: int) -> None:
    pixels, _, _ = prepare_image(load_image(record), resolution, center_crop=True, random_flip=False)
    assert pixels.shape == (3, resolution, resolution) and pixels.dtype == torch.float32
    assert torch.isfinite(pixels).all() and pixels.min() >= -1 and pixels.max() <= 1


def build_messy_folder(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Write good and bad files; return ({good name: expected stored mode}, {bad name: reason})."""
    root.mkdir(parents=True, exist_ok=True)
    deep = Image.fromarray(np.random.RandomState(1).randint(0, 65536, (64, 72)).astype(np.uint16))
    assert deep.mode == "I;16"
    palette = noise(64, 64, 2).convert("P")
    assert palette.mode == "P"
    good = {
        "good.png": (noise(80, 72, 3), "PNG", "RGB"),
        "good.jpg": (noise(96, 64, 4), "JPEG", "RGB"),
        "cmyk.jpg": (noise(70, 70, 5, "CMYK"), "JPEG", "CMYK"),
        "rgba.png": (noise(64, 80, 6, "RGBA"), "PNG", "RGBA"),
        "deep.png": (deep, "PNG", "I;16"),
        "palette.png": (palette, "PNG", "P"),
        "small.png": (noise(20, 30, 7), "PNG", "RGB"),
        "nocap.png": (noise(64, 64, 8), "PNG", "RGB"),
        "sub/longcap.webp": (noise(66, 64, 9), "WEBP", "RGB"),
    }
    for name, (image, fmt, _) in good.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(encode(image, fmt))
        if name != "nocap.png":
            (root / name).with_suffix(".txt").write_text(f"a picture called {Path(name).stem}")
    (root / "sub/longcap.txt").write_text(" ".join(f"word{i}" for i in range(100)))
    png, jpg, webp = (encode(noise(64, 64, 10), fmt) for fmt in ("PNG", "JPEG", "WEBP"))
    bad = {
        "cut.png": (png[: len(png) // 2], TRUNCATED),
        "cut.jpg": (jpg[: len(jpg) * 2 // 3], TRUNCATED),
        "cut.webp": (webp[: len(webp) - 100], TRUNCATED),
        "random.png": (b"\x00junk" + np.random.RandomState(11).bytes(2000), NOT_AN_IMAGE),
        "empty.jpg": (b"", "empty file"),
        "notes.webp": (b"these are my notes, not a picture\n", NOT_AN_IMAGE),
    }
    for name, (blob, _) in bad.items():
        (root / name).write_bytes(blob)
    (root / "cut.txt").write_text("a caption for a broken file")
    return {name: mode for name, (_, _, mode) in good.items()}, {name: reason for name, (_, reason) in bad.items()}


def test_preflight_skips_and_reports_bad_files_and_keeps_every_good_one(tmp_path):
    root = tmp_path / "data"
    good, bad = build_messy_folder(root)
    before = snapshot(root)
    cfg = make_cfg(root, caption_prefix="ghibli, ", default_caption="a picture")
    records = load_records(cfg, tmp_path / "cache")
    assert len(records) == len(good) + len(bad)
    uncaptioned = {"nocap.png", "random.png", "empty.jpg", "notes.webp"}  # the cut.* files share cut.txt
    assert {r.name for r in records if not r.captioned} == {str(root / n) for n in uncaptioned}

    usable, report = preflight(records, RES)

    by_name = {str(root / n): n for n in [*good, *bad]}
    assert [by_name[r.name] for r in usable] == [by_name[r.name] for r in records if by_name[r.name] in good]
    assert {by_name[s["name"]]: s["reason"] for s in report["skipped"]} == bad
    assert all(s["key"] == r.key for s in report["skipped"] for r in records if r.name == s["name"])
    assert {by_name[c["name"]]: c["mode"] for c in report["converted"]} == {
        n: m for n, m in good.items() if m != "RGB"
    }
    assert report["small"] == [{"name": str(root / "small.png"), "size": [20, 30]}]
    assert report["small_policy"] == SMALL_POLICY == "kept; upscaled to the training resolution by the normal resize"
    assert (report["n_total"], report["n_usable"], report["resolution"]) == (15, 9, RES)
    assert report["default_caption_used"] == 1 and report["empty_captions"] == 0
    assert json.loads(json.dumps(report)) == report
    for record in usable:  # including the converted modes and the small image
        check_trainable(record, RES)
    assert snapshot(root) == before  # nothing deleted, rewritten or touched

    path = write_data_report(tmp_path / "run", report)
    assert path == tmp_path / "run" / "data_report.json"
    assert json.loads(path.read_text()) == report
    assert [p.name for p in path.parent.iterdir()] == ["data_report.json"]  # no temp file left


def test_caption_length_report_counts_tokens_with_bos_and_eos(tmp_path):
    from ghibli_lab.pipeline import tiny_tokenizer

    tokenizer = tiny_tokenizer()  # every non-space character is one token, plus BOS and EOS
    root = tmp_path / "data"
    build_messy_folder(root)
    usable, _ = preflight(load_records(make_cfg(root, caption_prefix="ghibli, "), tmp_path), RES)
    report = caption_length_report(usable, tokenizer)
    long_caption = "ghibli, " + " ".join(f"word{i}" for i in range(100))
    assert report == {
        "too_long": 1,
        "max_tokens": len(long_caption.replace(" ", "")) + 2,
        "examples": [str(root / "sub" / "longcap.webp")],
        "max_length": 77,
    }
    # The limit is inclusive: 75 characters + BOS + EOS fit, 76 don't.
    fits, over = "x" * 75, "y" * 76
    records = [Record(str(i), f"r{i}", c) for i, c in enumerate([fits, over, over, fits])]
    assert caption_length_report(records, tokenizer) == {
        "too_long": 2, "max_tokens": 78, "examples": ["r1", "r2"], "max_length": 77
    }
    assert caption_length_report(records, tokenizer, max_length=78)["too_long"] == 0
    assert caption_length_report([], tokenizer) == {"too_long": 0, "max_tokens": 0, "examples": [], "max_length": 77}


def test_too_few_usable_images_is_a_clear_error_carrying_the_report(tmp_path):
    (tmp_path / "ok.png").write_bytes(encode(noise(64, 64), "PNG"))
    (tmp_path / "bad.png").write_bytes(b"nope")
    (tmp_path / "cut.jpg").write_bytes(encode(noise(64, 64), "JPEG")[:300])
    records = load_records(make_cfg(tmp_path), tmp_path / "cache")
    message = r"^only 1 usable images of 3 \(need at least 2\); see the skipped list: "
    with pytest.raises(ValueError, match=message) as err:
        preflight(records, RES)
    assert isinstance(err.value, PreflightError)
    assert f"{tmp_path / 'bad.png'}: {NOT_AN_IMAGE}" in str(err.value) and "cut.jpg" in str(err.value)
    assert err.value.report["n_usable"] == 1 and len(err.value.report["skipped"]) == 2
    assert len(preflight(records, RES, min_images=1)[0]) == 1
    with pytest.raises(ValueError, match="only 1 usable images of 1 .*no file was skipped"):
        preflight(records[2:], RES)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_and_unreadable_bytes_records_are_skipped(monkeypatch):
    big, ok = encode(noise(64, 64), "PNG"), encode(noise(8, 8), "PNG")
    records = [
        Record("a", "hub#0", "c", data=big),
        Record("b", "hub#1", "c", data=ok),
        Record("c", "hub#2", "c", data=encode(noise(40, 40), "JPEG")[:-200]),
        Record("d", "gone.png", "c", path="/nonexistent/gone.png"),
    ]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is over twice the limit: an error
    usable, report = preflight(records, 8, min_images=1)
    assert usable == [records[1]]
    assert [s["reason"] for s in report["skipped"]] == [
        "image too large (decompression bomb limit)",
        TRUNCATED,
        "cannot read file: No such file or directory",
    ]


def test_truncated_files_are_found_even_if_a_library_allows_them(monkeypatch, tmp_path):
    png = encode(noise(64, 64), "PNG")
    records = [Record("a", "cut", "c", data=png[:-500]), Record("b", "whole", "c", data=png)]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    usable, report = preflight(records, RES, min_images=1)
    assert usable == records[1:] and report["skipped"][0]["reason"] == TRUNCATED
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # put back as it was


def test_identical_files_are_decoded_once_but_all_reported(tmp_path, monkeypatch):
    from ghibli_lab import data

    blob = encode(noise(64, 64, mode="CMYK"), "JPEG")
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(blob)
    calls = []
    real = data._decode
    monkeypatch.setattr(data, "_decode", lambda r: calls.append(r) or real(r))
    usable, report = preflight(load_records(make_cfg(tmp_path), tmp_path / "c"), RES)
    assert len(calls) == 1 and len(usable) == 2 and len(report["converted"]) == 2


# ----------------------------------------------------------------------------------------------
# fuzz: whatever is in the folder, preflight never crashes, and kept means trainable

FUZZ_RES = 16
# Each mode with formats Pillow can write it in (the content decides the decoder, not the extension).
SAVE_FORMATS = {
    "1": ["PNG", "BMP"], "L": ["PNG", "JPEG", "WEBP", "BMP"], "LA": ["PNG", "TIFF"], "P": ["PNG", "BMP"],
    "PA": ["TIFF"], "RGB": ["PNG", "JPEG", "WEBP", "BMP"], "RGBA": ["PNG", "WEBP", "TIFF"],
    "CMYK": ["JPEG", "TIFF"], "I": ["TIFF"], "I;16": ["PNG", "TIFF"], "F": ["TIFF"],
}


def odd_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    if mode == "I;16":
        return Image.fromarray(rng.randint(0, 65536, (h, w)).astype(np.uint16))
    if mode == "I":
        return Image.fromarray(rng.randint(-(2**20), 2**20, (h, w)).astype(np.int32))
    if mode == "F":
        return Image.fromarray((rng.randn(h, w) * 300).astype(np.float32))
    return noise(w, h, seed, "RGBA" if mode == "PA" else "RGB").convert(mode)


def good_file(mode: str, i: int, w: int, h: int, seed: int) -> tuple[str, bytes]:
    formats = SAVE_FORMATS[mode]
    return "good", encode(odd_image(mode, w, h, seed), formats[i % len(formats)])


good_files = st.builds(
    good_file,
    st.sampled_from(sorted(SAVE_FORMATS)), st.integers(0, 3), st.integers(1, 40), st.integers(1, 40), st.integers(0, 99),
)
truncated_files = st.builds(
    lambda fmt, w, h, seed, cut: ("cut", encode(noise(w, h, seed), fmt), cut),
    st.sampled_from(["PNG", "JPEG", "WEBP"]), st.integers(8, 40), st.integers(8, 40), st.integers(0, 99),
    st.one_of(st.integers(0, 999), st.integers(-30, -1)),  # keep a fraction (per mille), or drop the last bytes
)
random_files = st.builds(lambda blob: ("random", blob), st.binary(max_size=300))
files = st.lists(
    st.tuples(st.one_of(good_files, truncated_files, random_files), st.sampled_from(IMAGE_EXTENSIONS), st.booleans()),
    min_size=1, max_size=6,
)


def pil_decodes(blob: bytes) -> bool:
    """An independent opinion: can plain PIL open and fully load these bytes?"""
    try:
        with Image.open(io.BytesIO(blob)) as im:
            im.load()
        return True
    except Exception:
        return False


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=files)
def test_fuzz_preflight_never_crashes_and_kept_means_trainable(files):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp, "data")
        root.mkdir()
        expect_kept, captioned = {}, {}
        for i, (spec, ext, has_caption) in enumerate(files):
            name = str(root / f"{i:02d}_{spec[0]}{ext}")
            blob = spec[1]
            if spec[0] == "good":
                expect_kept[name] = True
            elif spec[0] == "cut":
                blob = blob[: len(blob) * spec[2] // 1000 if spec[2] >= 0 else spec[2]]
                # A cut file may only be kept when the cut missed every pixel (e.g. a PNG's IEND chunk).
                expect_kept[name] = None if pil_decodes(blob) else False
                if expect_kept[name] is None:
                    whole = load_image(Record("k", "whole", "", data=spec[1]))
                    cut = load_image(Record("k", "cut", "", data=blob))
                    assert np.array_equal(np.asarray(whole), np.asarray(cut)), "a truncated file decoded differently"
            else:
                expect_kept[name] = pil_decodes(blob)
            Path(name).write_bytes(blob)
            if has_caption:
                Path(name).with_suffix(".txt").write_text(f"caption {i}")
            captioned[name] = has_caption
        before = snapshot(root)

        records = load_records(make_cfg(root, resolution=FUZZ_RES, default_caption="dflt"), Path(tmp, "cache"))
        usable, report = preflight(records, FUZZ_RES, min_images=0)

        kept = {r.name for r in usable}
        skipped = {s["name"] for s in report["skipped"]}
        assert kept | skipped == set(expect_kept) and not kept & skipped
        assert len(report["skipped"]) == len(skipped)
        for name, expected in expect_kept.items():
            if expected is not None:
                assert (name in kept) == expected, (name, report["skipped"])
            event(f"{Path(name).stem.split('_')[1]} {'kept' if name in kept else 'skipped'}")
        for s in report["skipped"]:
            event(s["reason"].split(":")[0])
        assert all(s["reason"] for s in report["skipped"])
        assert usable == [r for r in records if r.name in kept]
        assert report["default_caption_used"] == sum(not captioned[n] for n in kept)
        assert report["n_usable"] == len(usable) and report["n_total"] == len(records)
        json.dumps(report)
        for record in usable:
            check_trainable(record, FUZZ_RES)
        assert snapshot(root) == before
