"""Image metrics (KID, FID, CMMD, CLIP score, diversity, val loss), the registry that lists them,
and the paired LoRA − base intervals, with the protocol stamped.

Features are extracted once per image set (``extract_features``) and every metric and the
bootstrap work from them. KID and FID use torchmetrics' math (``poly_mmd``, ``_compute_fid``) on
features that follow clean-fid's protocol (Parmar et al. 2022, "On Aliased Resizing and
Surprising Subtleties in GAN Evaluation"):

* features: the StyleGAN2-ADA TorchScript port of TF Inception-v3 (``inception-2015-12-05.pt``),
  pool3 features (2048-d), input scaled as clean-fid does, ``(x - 128) / 128``;
* resize: per channel, PIL bicubic on float32 images (mode "F") to 299x299, no uint8 round trip.

Every feature module takes uint8 ``[N, 3, H, W]`` of any size, resizes by itself, returns float
``[N, D]`` and carries ``num_features`` (torchmetrics' ``feature=`` convention).

Offline, nothing is downloaded: a missing Inception file or an uncached CLIP model raises
``FeatureUnavailable`` naming the file or model and how to point at a local copy. ``features="tiny"``
builds small random seeded models in memory for tests.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from ghibli_lab.hub import OfflineError, check_hub_resource, reachable
from ghibli_lab.pipeline import tiny_tokenizer
from ghibli_lab.stats import (
    bootstrap_weights,
    gaussian_kernel,
    percentile_interval,
    polynomial_kernel,
    weighted_fid,
    weighted_mean,
    weighted_mmd2,
)

INCEPTION_FILE = "inception-2015-12-05.pt"
# clean-fid 0.1.35, cleanfid/downloads_helper.py: `inception_url`.
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
# clean-fid publishes no checksum. This is the digest k-diffusion (crowsonkb/k-diffusion,
# k_diffusion/evaluation.py, PyPI k-diffusion 0.1.1.post1) verifies for this exact URL before use;
# several unrelated projects pin the same value. Not recomputed here (the URL is unreachable).
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_DIM = 2048
INCEPTION_SIZE = 299

TINY_SEED = 0  # fixed, so tiny features are the same in every run
TINY_DIM = 64
TINY_SIZE = 64
FID_MIN_N = 2048  # below this FID is dominated by its small-sample bias (Heusel et al. 2017 use 50k)


class FeatureUnavailable(RuntimeError):
    """A feature model is needed, is not available locally, and can't be downloaded."""


class TensorFeaturesCLIPModel(CLIPModel):
    """``CLIPModel`` whose ``get_*_features`` return the projected embedding tensor.

    transformers 5 returns a ``BaseModelOutputWithPooling`` (projection in ``.pooler_output``);
    torchmetrics 1.9 ``CLIPScore`` expects the tensor (transformers 4 behaviour) and calls ``.norm``.
    """

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _pooled(super().get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _pooled(super().get_text_features(*args, **kwargs))


def _pooled(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class FeatureModels:
    """Feature extractors for one evaluation, and the protocol to stamp on its numbers."""

    name: str  # "inception" | "clip" | "tiny"
    image: nn.Module  # uint8 [N, 3, H, W] -> float [N, D]; torchmetrics `feature=`
    clip_model: TensorFeaturesCLIPModel
    clip_processor: CLIPProcessor
    protocol: dict


# ----------------------------------------------------------------------------------------------
# Resizing and feature modules


def clean_resize(images_uint8: torch.Tensor, size: int) -> torch.Tensor:
    """clean-fid's resize: each channel as a float32 PIL image (mode "F"), bicubic, to size x size.

    Resizing in float avoids the uint8 quantisation and the aliasing of tensor-library resizers
    that Parmar et al. 2022 show shift FID (cleanfid/resize.py, ``make_resizer("PIL", False, ...)``).
    Returns float32 ``[N, 3, size, size]`` in 0..255.
    """
    if images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"expected images as [N, 3, H, W], got shape {tuple(images_uint8.shape)}")
    arrays = images_uint8.detach().cpu().numpy().astype(np.float32)
    out = np.empty((len(arrays), 3, size, size), dtype=np.float32)
    for i, image in enumerate(arrays):
        for c in range(3):
            channel = Image.fromarray(image[c])  # 2-D float32 -> mode "F"
            out[i, c] = np.asarray(channel.resize((size, size), resample=Image.Resampling.BICUBIC))
    return torch.from_numpy(out.clip(0, 255))


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


class CleanInception(nn.Module):
    """clean-fid's Inception features: clean resize to 299, ``(x - 128) / 128``, pool3 (2048-d).

    Mirrors ``cleanfid.inception_torchscript.InceptionV3W`` with ``resize_inside=False``, which
    runs ``base.layers`` of the TorchScript file on the already resized image.
    """

    num_features = INCEPTION_DIM

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        self.base = scripted

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = clean_resize(images_uint8, INCEPTION_SIZE).to(_module_device(self))
        return self.base.layers.forward((x - 128) / 128).view(len(x), INCEPTION_DIM)


class TinyImageFeatures(nn.Module):
    """A small random conv net with the same clean-resize input path, for tests (64-d)."""

    num_features = TINY_DIM

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, TINY_DIM),
        )

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = clean_resize(images_uint8, TINY_SIZE).to(_module_device(self))
        return self.net((x - 128) / 128)


class ClipImageFeatures(nn.Module):
    """CLIP image embeddings (projected, not normalised) as a torchmetrics feature module."""

    def __init__(self, model: TensorFeaturesCLIPModel, processor: CLIPProcessor):
        super().__init__()
        self.model = model
        self.processor = processor
        self.num_features = int(model.config.projection_dim)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=list(images_uint8.cpu()), return_tensors="pt")["pixel_values"]
        return self.model.get_image_features(pixel_values=pixels.to(_module_device(self.model))).float()


# ----------------------------------------------------------------------------------------------
# Loading


def load_feature_models(
    features: str,
    cache_dir: str | Path,
    clip_model: str = "openai/clip-vit-large-patch14",
    inception_path: str | None = None,
    device: str | torch.device = "cpu",
) -> FeatureModels:
    """Load the feature models for ``features`` ("inception", "clip" or "tiny") onto ``device``.

    "inception": clean-fid Inception for KID/FID plus the CLIP model ``clip_model`` for CLIP score
    and style similarity. "clip": CLIP image embeddings for KID/FID as well. "tiny": small random
    seeded models built in memory (no download; for tests).
    """
    if features == "tiny":
        fm = _load_tiny()
    elif features == "inception":
        # The Inception file is checked first, so an offline error names it, not CLIP.
        path, digest = _inception_file(cache_dir, inception_path)
        model, processor = _load_clip(clip_model)
        fm = FeatureModels(
            name="inception",
            image=CleanInception(_load_torchscript(path)),
            clip_model=model,
            clip_processor=processor,
            protocol={
                "image_features": {
                    "name": "inception",
                    "file": INCEPTION_FILE,
                    "sha256": digest,
                    "dim": INCEPTION_DIM,
                    "url": INCEPTION_URL,
                },
                "clip": _clip_protocol(clip_model, model, processor),
                "resize": f"clean-fid: PIL bicubic, float32, {INCEPTION_SIZE}x{INCEPTION_SIZE}",
            },
        )
    elif features == "clip":
        model, processor = _load_clip(clip_model)
        clip_protocol = _clip_protocol(clip_model, model, processor)
        fm = FeatureModels(
            name="clip",
            image=ClipImageFeatures(model, processor),
            clip_model=model,
            clip_processor=processor,
            protocol={
                "image_features": {
                    "name": f"clip:{clip_model}",
                    "file": None,
                    "sha256": clip_protocol["sha256"],
                    "dim": int(model.config.projection_dim),
                },
                "clip": clip_protocol,
                "resize": clip_protocol["preprocess"],
            },
        )
    else:
        raise ValueError(f"features={features!r} is not one of 'inception', 'clip', 'tiny'")
    fm.image.to(device).eval().requires_grad_(False)
    fm.clip_model.to(device)
    return fm


def _load_tiny() -> FeatureModels:
    """Random seeded conv net + CLIP; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        image = TinyImageFeatures()
        model, processor = _tiny_clip()
    return FeatureModels(
        name="tiny",
        image=image,
        clip_model=model,
        clip_processor=processor,
        protocol={
            "image_features": {
                "name": "tiny",
                "file": None,
                "sha256": state_dict_sha256(image),
                "dim": TINY_DIM,
            },
            "clip": _clip_protocol("tiny", model, processor),
            "resize": f"clean-fid: PIL bicubic, float32, {TINY_SIZE}x{TINY_SIZE}",
        },
    )


def _tiny_clip() -> tuple[TensorFeaturesCLIPModel, CLIPProcessor]:
    """A CLIP with 32-wide towers on 32 px images and the byte-level tiny tokenizer."""
    tokenizer = tiny_tokenizer()
    tower = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **tower,
        ),
        vision_config=dict(image_size=32, patch_size=8, **tower),
        projection_dim=32,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model = TensorFeaturesCLIPModel(config).eval().requires_grad_(False)
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _load_clip(name: str) -> tuple[TensorFeaturesCLIPModel, CLIPProcessor]:
    """A hub id or local directory; offline and uncached -> FeatureUnavailable."""
    try:
        check_hub_resource(name, "model", "eval.clip_model", "config.json")
    except OfflineError as e:
        raise FeatureUnavailable(str(e)) from e
    model = TensorFeaturesCLIPModel.from_pretrained(name, dtype=torch.float32)
    # The PIL backend everywhere, so CLIP numbers don't depend on whether torchvision is installed.
    processor = CLIPProcessor.from_pretrained(name, backend="pil")
    return model.eval().requires_grad_(False), processor


def _clip_protocol(name: str, model: CLIPModel, processor: CLIPProcessor) -> dict:
    ip = processor.image_processor
    crop = ip.crop_size
    preprocess = (
        f"CLIP processor ({type(ip).__name__}): {Image.Resampling(ip.resample).name.lower()} "
        f"shortest side {ip.size['shortest_edge']}, center crop {crop['height']}x{crop['width']}"
    )
    return {"name": name, "sha256": state_dict_sha256(model), "preprocess": preprocess}


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and raw bytes, in name order)."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# The Inception file: find, download, verify


def _inception_file(cache_dir: str | Path, inception_path: str | None) -> tuple[Path, str]:
    """Path and sha256 of a verified ``inception-2015-12-05.pt``, downloading it when online."""
    if inception_path:
        path = Path(inception_path).expanduser()
        path = path / INCEPTION_FILE if path.is_dir() else path
        if not path.is_file():
            raise FeatureUnavailable(f"eval.inception_path={inception_path!r}: no such file")
    else:
        folder = Path(cache_dir).expanduser() / "features"
        path = folder / INCEPTION_FILE
        if not path.is_file():
            _download_inception(path)
    return path, _verified_sha256(path)


def _download_inception(dest: Path) -> None:
    """Fetch the file to a temporary name and rename, so an interrupted download leaves nothing."""
    unavailable = (
        f"KID/FID with features=inception need the clean-fid Inception weights {INCEPTION_FILE}, "
        f"which are not in {dest.parent} and can't be downloaded"
    )
    advice = (
        f"Download it where the network is reachable:\n    curl -L -o {INCEPTION_FILE} {INCEPTION_URL}\n"
        f"then put it in {dest.parent}/ or point at it: eval.inception_path=/path/to/{INCEPTION_FILE}"
    )
    if not reachable(INCEPTION_URL):
        raise FeatureUnavailable(f"{unavailable} (offline). {advice}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{INCEPTION_FILE}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(INCEPTION_URL, timeout=60) as response:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    except OSError as e:  # URLError and socket timeouts are OSErrors
        Path(tmp).unlink(missing_ok=True)
        raise FeatureUnavailable(f"{unavailable} ({e}). {advice}") from e


def _verified_sha256(path: Path) -> str:
    digest = file_sha256(path)
    if INCEPTION_SHA256 is not None and digest != INCEPTION_SHA256:
        raise FeatureUnavailable(
            f"{path} has sha256 {digest}, but clean-fid's {INCEPTION_FILE} ({INCEPTION_URL}) has "
            f"{INCEPTION_SHA256}. The file is corrupt or a different model: delete it and download "
            f"it again, or point eval.inception_path at a correct copy."
        )
    return digest


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    # The published clean-fid Inception exists only as TorchScript, which torch now marks deprecated.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


# ----------------------------------------------------------------------------------------------
# Metrics


@dataclass
class Features:
    """What the metrics see of a set of images, extracted once and reused by every metric and by
    the bootstrap."""

    image: torch.Tensor  # [N, D] float64, the KID/FID features (Inception, CLIP or tiny)
    clip: torch.Tensor  # [N, C] float64, L2-normalised CLIP image embeddings
    text: Optional[torch.Tensor] = None  # [N, C] normalised CLIP embeddings of each image's caption


def extract_features(images: torch.Tensor, fm: FeatureModels, texts: Optional[list[str]] = None, batch_size: int = 32) -> Features:
    """Features of uint8 ``[N, 3, H, W]`` images (and of one caption per image, if given)."""
    with torch.no_grad():
        image = torch.cat([fm.image(batch).double().cpu() for batch in images.split(batch_size)])
    return Features(
        image=image,
        clip=clip_image_embeddings(images, fm, batch_size).double(),
        text=clip_text_embeddings(texts, fm, batch_size).double() if texts is not None else None,
    )


def clip_image_embeddings(images: torch.Tensor, fm: FeatureModels, batch_size: int = 32) -> torch.Tensor:
    """L2-normalised CLIP image embeddings ``[N, D]`` of uint8 images."""
    embed = ClipImageFeatures(fm.clip_model, fm.clip_processor)
    with torch.no_grad():
        feats = torch.cat([embed(batch) for batch in images.split(batch_size)])
    return torch.nn.functional.normalize(feats, dim=-1).cpu()


def clip_text_embeddings(texts: list[str], fm: FeatureModels, batch_size: int = 32) -> torch.Tensor:
    """L2-normalised CLIP text embeddings ``[N, D]``.

    Truncated *by the tokenizer* to its 77 tokens, which keeps the end-of-text token: CLIP pools
    the text at that token, so cutting token ids after tokenising (as torchmetrics 1.9's
    CLIPScore does) pools every over-long prompt at the start token, and any two of them get the
    same embedding.
    """
    tokenizer = fm.clip_processor.tokenizer
    device = _module_device(fm.clip_model)
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True,
                max_length=tokenizer.model_max_length, return_tensors="pt",
            )
            out.append(fm.clip_model.get_text_features(**{k: v.to(device) for k, v in tokens.items()}).float())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()


@dataclass
class Sample:
    """One side of an evaluation (the LoRA's or the base model's images) against the held-out set:
    what every metric of ``METRICS`` is computed from.

    ``real`` holds one image per held-out prompt; ``prompt_of`` gives each generated image's
    prompt (None: unpaired sets, each image its own prompt). ``val_losses`` are per held-out image.
    """

    real: Features
    fake: Features
    prompt_of: Optional[torch.Tensor] = None
    val_loss: Optional[float] = None  # the held-out loss as training computes it
    val_losses: Optional[torch.Tensor] = None  # its per-image terms, for the bootstrap
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    seed: int = 0

    @property
    def prompts_real(self) -> Optional[torch.Tensor]:
        return torch.arange(len(self.real.image)) if self.prompt_of is not None else None

    @functools.cached_property
    def kid(self) -> tuple[float, float]:
        return kid_unbiased(self.real.image, self.fake.image, self.kid_subset_size, self.kid_subsets, self.seed, with_std=True)

    @functools.cached_property
    def kernels(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Kernel matrices (real-real, fake-fake, real-fake) of KID's and CMMD's kernels."""
        r, f = self.real, self.fake
        return {
            "kid": (polynomial_kernel(r.image, r.image), polynomial_kernel(f.image, f.image), polynomial_kernel(r.image, f.image)),
            "cmmd": (gaussian_kernel(r.clip, r.clip), gaussian_kernel(f.clip, f.clip), gaussian_kernel(r.clip, f.clip)),
        }

    def mmd2(self, kernel: str, wr: torch.Tensor, wf: torch.Tensor) -> torch.Tensor:
        return weighted_mmd2(*self.kernels[kernel], wr, wf, self.prompts_real, self.prompt_of)

    def fake_weights(self, wr: torch.Tensor) -> torch.Tensor:
        """Per-image weights of the generated images from per-prompt weights ``wr`` [B, n]."""
        return wr[:, self.prompt_of] if self.prompt_of is not None else wr

    def unit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights of the full sample: every image once."""
        wr = torch.ones(1, len(self.real.image), dtype=torch.float64)
        wf = torch.ones(1, len(self.fake.image), dtype=torch.float64)
        return wr, wf


def _clip_scores(x: Sample) -> torch.Tensor:
    # 100 * cos(image, caption) per generated image (Hessel et al. 2021 with torchmetrics' 100 scale;
    # no clamp at 0: a negative score says the images don't match their captions, and shows it).
    return 100 * (x.fake.clip * x.fake.text).sum(1)


def _diversity(x: Sample) -> Optional[torch.Tensor]:
    """Per prompt: mean cosine distance between the images generated for it (None with one each)."""
    if x.prompt_of is None:
        return None
    out = []
    for p in range(len(x.real.image)):
        emb = x.fake.clip[x.prompt_of == p]
        if len(emb) < 2:
            return None
        sims = emb @ emb.T
        k = len(emb)
        out.append(1 - (sims.sum() - sims.diagonal().sum()) / (k * (k - 1)))
    return torch.stack(out)


def _per_prompt_mean(values: Optional[torch.Tensor], w: torch.Tensor) -> Optional[torch.Tensor]:
    return None if values is None else weighted_mean(values, w)


@dataclass(frozen=True)
class Metric:
    """One evaluation metric: its label, which way is better, and how to compute it.

    ``resample(sample, wr, wf)`` computes it under bootstrap weights (``wr`` [B, n] per held-out
    prompt, ``wf`` [B, m] per generated image) and returns [B] values; the unit weights give the
    reported value unless ``point`` computes it another way (KID's subsets). None: not available.
    """

    label: str
    lower_is_better: bool
    resample: Optional[Callable[[Sample, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]]
    point: Optional[Callable[[Sample], Optional[float]]] = None
    in_table: bool = True  # shown in tables, heatmaps, intervals and W&B (else in metrics.json only)
    note: str = ""  # how it is computed, for the protocol

    def value(self, x: Sample) -> Optional[float]:
        if self.point is not None:
            return self.point(x)
        values = self.resample(x, *x.unit())
        return None if values is None else float(values[0])


HEADLINE = "kid"  # tables sort by it, and "best" is judged on its LoRA - base interval
# The registry: evaluation computes, and the tables and the report show, exactly these, in this order.
# A new metric is one entry here.
METRICS: dict[str, Metric] = {
    "kid": Metric(
        "KID", True, lambda x, wr, wf: x.mmd2("kid", wr, wf), point=lambda x: x.kid[0],
        note="unbiased MMD², kernel (x·y/d + 1)³, mean over random subsets (Bińkowski et al. 2018)",
    ),
    # The spread of KID over its (overlapping) subsets: not an uncertainty of KID; the interval is.
    "kid_subset_std": Metric("KID std over subsets", True, None, point=lambda x: x.kid[1], in_table=False),
    "fid": Metric(
        "FID", True, lambda x, wr, wf: weighted_fid(x.real.image, x.fake.image, wr, wf),
        point=lambda x: features_fid(x.real.image, x.fake.image),
        note="Fréchet distance of the features (Heusel et al. 2017); biased by N below 2048",
    ),
    "cmmd": Metric(
        "CMMD", True, lambda x, wr, wf: 1000 * x.mmd2("cmmd", wr, wf),
        note="1000 x unbiased MMD² of normalised CLIP image embeddings, Gaussian kernel σ=10 (Jayasumana et al. 2024)",
    ),
    "clip_score": Metric(
        "CLIP score", False, lambda x, wr, wf: None if x.fake.text is None else weighted_mean(_clip_scores(x), wf),
        note="mean 100 x cos(image, caption), captions truncated by the tokenizer (end token kept), not clamped",
    ),
    "diversity": Metric(
        "diversity", False, lambda x, wr, wf: _per_prompt_mean(_diversity(x), wr),
        note="mean CLIP cosine distance between images of the same prompt (needs eval.images_per_prompt >= 2)",
    ),
    "val_loss": Metric(
        "held-out val loss", True, lambda x, wr, wf: _per_prompt_mean(x.val_losses, wr), point=lambda x: x.val_loss,
        note="unweighted MSE at fixed timesteps with fixed noise, as training's val/loss",
    ),
}


def fmt(value) -> str:
    """A metric value as tables print it: 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def score(x: Sample) -> dict[str, Optional[float]]:
    """Every metric of ``METRICS`` for one side."""
    return {name: metric.value(x) for name, metric in METRICS.items()}


def paired_differences(lora: Sample, base: Sample, draws: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """LoRA − base for every metric in the table, with a ``level`` bootstrap interval over the
    held-out prompts (both sides resampled with the same draws; see stats.py). ``better``: the
    interval excludes zero in the metric's better direction; ``worse``: in the other."""
    n = len(lora.real.image)
    wr = bootstrap_weights(n, draws, seed)
    out = {}
    for name, metric in METRICS.items():
        if not metric.in_table or metric.resample is None:
            continue
        a, b = metric.value(lora), metric.value(base)
        samples_a = metric.resample(lora, wr, lora.fake_weights(wr))
        samples_b = metric.resample(base, wr, base.fake_weights(wr))
        if a is None or b is None or samples_a is None or samples_b is None:
            continue
        low, high = percentile_interval(samples_a - samples_b, level)
        sign = -1 if metric.lower_is_better else 1
        out[name] = {
            "diff": a - b,
            "low": low,
            "high": high,
            "better": (sign * low > 0) if sign > 0 else (high < 0),
            "worse": (high < 0) if sign > 0 else (low > 0),
        }
    return out


def unpaired_kid(real: Features, fake: Features, draws: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """KID between two sets that share no prompts (one adapter's images against another style's
    held-out images): the unbiased MMD² under KID's kernel over all pairs, with a ``level``
    bootstrap interval that resamples both sets independently."""
    x = Sample(real, fake)
    kernels = x.kernels["kid"]
    ones = lambda n: torch.ones((1, n), dtype=torch.float64)  # noqa: E731
    value = weighted_mmd2(*kernels, ones(len(real.image)), ones(len(fake.image))).item()
    samples = weighted_mmd2(*kernels, bootstrap_weights(len(real.image), draws, seed), bootstrap_weights(len(fake.image), draws, seed + 1))
    low, high = percentile_interval(samples, level)
    return {"kid": value, "low": low, "high": high}


def style_separation(rows: dict[str, tuple[str, Features]], reals: dict[str, Features], draws: int, seed: int) -> dict:
    """The style-separation matrix: each run's generated images (``rows``: run -> (its style, its
    features)) scored against every style's held-out images (``reals``: style -> features) by
    unpaired KID with intervals. A run separates its style when its own style's KID is the row's
    lowest; clearly, when that interval lies below every other style's."""
    matrix = {}
    for run, (own, fake) in rows.items():
        cells = {style: unpaired_kid(real, fake, draws, seed) for style, real in reals.items()}
        others = [c for s, c in cells.items() if s != own]
        matrix[run] = {
            "style": own,
            "kid": cells,
            "lowest_is_own": all(cells[own]["kid"] < c["kid"] for c in others),
            "clearly": all(cells[own]["high"] < c["low"] for c in others),
        }
    return {"styles": sorted(reals), "runs": matrix, "metric": "KID (unpaired), 95% bootstrap interval over both sets"}


def best_run(results: dict[str, dict]) -> Optional[str]:
    """The run to mark best: among runs whose LoRA − base interval on ``HEADLINE`` excludes zero
    in the better direction, the one with the best value; None when no run is distinguishable
    from its base model (then no run should be called best)."""
    metric = METRICS[HEADLINE]
    better = {name: r["lora"][HEADLINE] for name, r in results.items() if r.get("paired", {}).get(HEADLINE, {}).get("better")}
    if not better:
        return None
    return (min if metric.lower_is_better else max)(better, key=better.get)


def interval_text(d: dict) -> str:
    """``-0.012 [-0.020, -0.004]``: a paired difference and its interval."""
    return f"{d['diff']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}]"


# Protocol keys that may differ between evaluations that are still comparable: where the base
# images are cached and whether they were reused, the LoRA's own scale, library versions, the method and its trigger.
LOCAL_PROTOCOL_KEYS = ("base_images", "base_images_status", "lora_scale", "versions", "method", "trigger")


def protocols_differ(protocols: list[dict]) -> bool:
    """Whether evaluations ran under different protocols (N, features, sampling, ...)."""
    comparable = [{k: v for k, v in p.items() if k not in LOCAL_PROTOCOL_KEYS} for p in protocols]
    return any(c != comparable[0] for c in comparable)


def summary_values(result: dict, name: str | None = None) -> dict[str, float]:
    """``eval/<metric>``, ``eval/base_<metric>`` and the LoRA − base intervals of one run's
    metrics.json, flat, for a W&B summary (``eval/<name>/...`` for a named evaluation)."""
    prefix = f"eval/{name}/" if name else "eval/"
    values = {f"{prefix}{k}": v for k, v in result["lora"].items() if v is not None}
    values |= {f"{prefix}base_{k}": v for k, v in result["base"].items() if v is not None}
    for k, d in result.get("paired", {}).items():
        values |= {f"{prefix}{k}_diff": d["diff"], f"{prefix}{k}_diff_low": d["low"], f"{prefix}{k}_diff_high": d["high"]}
    values[f"{prefix}n"] = result["protocol"]["n_fake"]
    return values


def compute_image_metrics(
    real: torch.Tensor,
    fake: torch.Tensor,
    prompts: list[str],
    fm: FeatureModels,
    kid_subset_size: int = 1000,
    batch_size: int = 32,
    seed: int = 0,
    prompt_of: Optional[torch.Tensor] = None,
) -> dict:
    """Every image metric for ``fake`` against ``real`` (uint8 [N, 3, H, W]), and the sample sizes.

    ``prompts`` has one caption per fake image (for the CLIP score). KID's subset size is clamped
    to the sample sizes; its subsets are drawn from a generator seeded by ``seed``.
    """
    _check_inputs(real, fake, prompts)
    n_real, n_fake = len(real), len(fake)
    subset = min(kid_subset_size, n_real, n_fake)
    sample = Sample(
        extract_features(real, fm, batch_size=batch_size),
        extract_features(fake, fm, texts=prompts, batch_size=batch_size),
        prompt_of=prompt_of,
        kid_subset_size=subset,
        seed=seed,
    )
    values = {k: v for k, v in score(sample).items() if k != "val_loss"}
    return {**values, **sample_sizes(n_real, n_fake, kid_subset_size)}


def sample_sizes(n_real: int, n_fake: int, kid_subset_size: int) -> dict:
    subset = min(kid_subset_size, n_real, n_fake)
    return {
        "n_real": n_real,
        "n_fake": n_fake,
        "kid_subset_size": subset,
        "kid_subset_clamped": subset < kid_subset_size,
        "fid_n_warning": _fid_n_warning(min(n_real, n_fake)),
    }


def _fid_n_warning(n: int) -> str | None:
    # The FID estimator is biased, by an amount that depends on N (Bińkowski et al. 2018); KID's is not.
    return f"FID with N={n} < {FID_MIN_N} is dominated by sample size; compare KID" if n < FID_MIN_N else None


def _check_inputs(real: torch.Tensor, fake: torch.Tensor, prompts: list[str]) -> None:
    for name, images in (("real", real), ("fake", fake)):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            got = f"{images.dtype} {tuple(images.shape)}"
            raise ValueError(f"{name} images must be uint8 [N, 3, H, W], got {got}")
        if len(images) < 2:
            raise ValueError(f"KID and FID need at least 2 {name} images, got {len(images)}")
    if len(prompts) != len(fake):
        raise ValueError(f"need one prompt per fake image: {len(prompts)} prompts for {len(fake)} images")


def clip_score(fake: torch.Tensor, prompts: list[str], fm: FeatureModels, batch_size: int = 32) -> float:
    """Mean 100 * cos(image, prompt) of uint8 images and their prompts (see ``clip_text_embeddings``)."""
    image = clip_image_embeddings(fake, fm, batch_size)
    text = clip_text_embeddings(prompts, fm, batch_size)
    return float((100 * (image * text).sum(1)).mean())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) (Heusel et al. 2017), in float64.

    Uses torchmetrics' own implementation (the one ``FrechetInceptionDistance`` runs), which takes
    Tr((S1 S2)^½) as the sum of square roots of the eigenvalues of S1 S2; clean-fid uses
    ``scipy.linalg.sqrtm``. Both give the same trace for covariance matrices.
    """
    from torchmetrics.image.fid import _compute_fid

    return float(_compute_fid(*(_float64(a) for a in (mu1, sigma1, mu2, sigma2))))


def kid_unbiased(feats1, feats2, subset_size: int = 1000, subsets: int = 100, seed: int = 0, with_std: bool = False):
    """Mean unbiased MMD² with the kernel (x·y / d + 1)³ over random subsets (Bińkowski et al. 2018);
    with ``with_std``, (mean, std over the subsets) as torchmetrics' ``KernelInceptionDistance``.

    torchmetrics' ``poly_mmd`` on features directly, drawn as ``KernelInceptionDistance`` draws them.
    """
    from torchmetrics.image.kid import poly_mmd

    f1, f2 = _float64(feats1), _float64(feats2)
    m = min(subset_size, len(f1), len(f2))
    generator = torch.Generator().manual_seed(seed)

    def draw(feats: torch.Tensor) -> torch.Tensor:
        return feats[torch.randperm(len(feats), generator=generator)[:m]]

    values = torch.stack([poly_mmd(draw(f1), draw(f2)) for _ in range(subsets)])
    return (float(values.mean()), float(values.std(unbiased=False))) if with_std else float(values.mean())


def features_fid(feats1: torch.Tensor, feats2: torch.Tensor) -> float:
    """FID of two feature sets: their means and covariances through ``frechet_distance``."""
    f1, f2 = _float64(feats1), _float64(feats2)
    return frechet_distance(f1.mean(0), torch.cov(f1.T), f2.mean(0), torch.cov(f2.T))


def _float64(array) -> torch.Tensor:
    """A CPU float64 tensor from a numpy array, a tensor on any device, or nested lists."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().double()
    return torch.as_tensor(np.asarray(array), dtype=torch.float64)
