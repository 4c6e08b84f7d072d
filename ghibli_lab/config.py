"""Typed schemas for the Hydra configs in ``conf/``.

Values live in YAML; these dataclasses only fix the keys and their types, so a typo or a
wrong type fails at compose time. ``check_config`` adds the range checks that types can't
express. Every option of a group fills exactly these keys.
"""

from __future__ import annotations

import datetime
import functools
import os
import re
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


# Absolute, so the entry points find their configs however they are started (python -m, a script,
# an import under a launcher); Hydra reads a relative config_path against the caller's module.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@dataclass
class ModelConfig:
    family: str = MISSING  # "sdxl" | "sd15": selects the pipeline class and the conditioning
    pretrained: str = MISSING  # hub id, local directory, or "tiny" (random weights built in code)
    vae: Optional[str] = None  # optional VAE override, e.g. madebyollin/sdxl-vae-fp16-fix
    variant: Optional[str] = None  # weight file variant on the hub, e.g. "fp16"


@dataclass
class DatasetConfig:
    name: str = MISSING
    source: str = MISSING  # "hub" | "folder" | "synthetic"
    path: Optional[str] = None  # hub dataset id, or a local folder
    image_column: str = "image"  # hub datasets only: column names
    caption_column: str = "text"
    num_images: Optional[int] = None  # cap on images used; synthetic: how many to generate
    resolution: int = 512
    center_crop: bool = True  # False: random crop
    random_flip: bool = False
    caption_prefix: str = ""  # trigger prepended to every caption, e.g. "Still from the Anime, "
    default_caption: str = ""  # used when an image has no caption
    holdout_fraction: float = 0.1


@dataclass
class LoraConfig:
    rank: int = MISSING
    alpha: float = MISSING  # independent of rank; the effective scale is alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder: bool = False  # also train LoRA on the text encoder(s), both on SDXL
    text_encoder_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )


@dataclass
class SchedulerConfig:
    name: str = MISSING  # "ddpm" | "ddim": the sampler; training keeps the model's own schedule
    steps: int = MISSING  # inference steps


@dataclass
class GuidanceConfig:
    scale: float = MISSING  # classifier-free guidance scale; 1 disables guidance


@dataclass
class TrainConfig:
    max_steps: Optional[int] = 1000  # optimizer steps; null: use epochs
    epochs: Optional[int] = None
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    lr_scheduler: str = "constant"  # any name diffusers.optimization.get_scheduler knows
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the UNet (first steps are slow while it compiles)
    channels_last: bool = False  # UNet convolutions in channels_last memory format
    snr_gamma: Optional[float] = None  # min-SNR-gamma loss weighting; 5.0 is the paper's value
    noise_offset: float = 0.0
    val_every: int = 100  # 0 = off
    val_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    sample_every: int = 0  # 0 = off; samples are always written at the end
    checkpoint_every: int = 0  # 0 = off
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    resume: Optional[str] = None  # null | auto (newest checkpoint in this run dir) | a checkpoint dir
    nonfinite: str = "stop"  # non-finite loss: stop (naming the batch's files) | skip the batch
    log_every: int = 10
    num_workers: int = 0
    cache: bool = True  # shared latent/text-embedding cache (needs dataset.center_crop)


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])


@dataclass
class LoggerConfig:
    name: str = MISSING  # "wandb" | "none"
    project: Optional[str] = None
    entity: Optional[str] = None
    mode: Optional[str] = None  # null: online if an API key is configured, else offline


@dataclass
class TrainRunConfig:
    name: str = "train"
    seed: int = 0
    output_root: str = "outputs"
    cache_dir: str = ".cache/ghibli_lab"
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    lora: LoraConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    guidance: GuidanceConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    logger: LoggerConfig = MISSING


@dataclass
class EvalConfig:
    features: str = "auto"  # inception | clip | tiny | auto (tiny for tiny models, else inception)
    scheduler: str = "ddim"  # ddpm | ddim
    steps: int = 30
    images_per_prompt: int = 2  # per held-out caption, at seeds seed .. seed + images_per_prompt - 1
    seed: int = 0
    resolution: Optional[int] = None  # null: the run's training resolution
    kid_subset_size: int = 1000  # clamped to N (and reported) when N is smaller
    clip_model: str = "openai/clip-vit-large-patch14"  # hub id or local dir
    inception_path: Optional[str] = None  # null: <cache_dir>/features/inception-2015-12-05.pt


@dataclass
class EvaluateRunConfig:
    run_dir: str = "outputs/latest"  # a run dir or a sweep dir
    cache_dir: Optional[str] = None  # null: the run's own training cache_dir
    guidance: GuidanceConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class GenerateConfig:
    """Schema of ``conf/generate.yaml``."""

    model: ModelConfig = MISSING
    scheduler: SchedulerConfig = MISSING  # the sampler and its steps
    run: Optional[str] = None
    prompt: Optional[str] = None
    prompts_file: Optional[str] = None
    loras: list[str] = field(default_factory=list)
    lora_scale: float = 1.0
    guidance_scale: float = 7.5
    seed: int = 0
    resolution: Optional[int] = None
    caption_prefix: Optional[str] = None
    blend: list[str] = field(default_factory=list)
    blend_weights: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    output_dir: str = MISSING


@dataclass
class ReportConfig:
    """Schema of ``conf/report.yaml``."""

    sweep_dir: str = "outputs/latest"  # a sweep dir (or a single run dir)
    eval_name: Optional[str] = None  # null: <run>/eval/; else <run>/eval/<name>/ (an evaluate multirun)
    tile: int = 128  # px per image in the base-vs-LoRA grids
    max_columns: int = 8  # at most this many (prompt, seed) columns per grid
    wandb: bool = True  # also log plots and grids to each run's W&B run


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainRunConfig)
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateRunConfig)
    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)
    ConfigStore.instance().store(name="report_schema", node=ReportConfig)
    if not OmegaConf.has_resolver("swept"):
        OmegaConf.register_new_resolver("swept", swept_values)
    if not OmegaConf.has_resolver("launch_time"):
        OmegaConf.register_new_resolver("launch_time", lambda fmt: launch_time().strftime(fmt))


@functools.lru_cache(maxsize=1)
def launch_time() -> datetime.datetime:
    """When this run was launched: now, or, under ``accelerate launch`` / ``torchrun`` (WORLD_SIZE
    > 1), the start time of the launcher process that all local ranks share. Hydra's ``${now:}``
    differs between ranks that start a second apart, which would give each its own run dir."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        try:
            ticks = int(Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
            boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
            return datetime.datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"))
        except (OSError, ValueError, IndexError, StopIteration):
            pass  # not Linux: pass hydra.run.dir=... explicitly for multi-process runs
    return datetime.datetime.now()


def swept_values(task_overrides: list[str], sweep_dir: str | None = None) -> str:
    """``lora.alpha-4_lora.rank-8``: this job's values of the keys swept on the command line.

    Used to name sweep sub-dirs (``hydra.sweep.subdir``). Hydra's ``override_dirname`` holds every
    override, swept or not; which ones were swept is only visible in the original arguments.
    Launchers that run jobs in other processes (submitit) have other arguments; then the sweep's
    ``multirun.yaml``, which the launcher writes first, has them. Falls back to all of this job's
    overrides when neither can be read.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    swept = set()
    args = sys.argv[1:]
    multirun = Path(sweep_dir) / "multirun.yaml" if sweep_dir else None
    if multirun is not None and multirun.is_file():
        args = list(OmegaConf.load(multirun).hydra.overrides.task)
    for arg in args:
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception:  # flags such as -m, and their values
            continue
        if override.is_sweep_override():
            swept.add(override.get_key_element())
    items = [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") in swept] or list(task_overrides)
    # key-value pairs joined by "_", and nothing Hydra's override grammar would need quoted
    # (no "=", ",", spaces), so a run dir can be passed back as run_dir=... as it is.
    labels = ("-".join(o.lstrip("+~").split("=", 1)) for o in sorted(items))
    return "_".join(re.sub(r"[^A-Za-z0-9._+-]", "-", label) for label in labels)


CHOICES: dict[str, tuple[Any, ...]] = {
    "model.family": ("sdxl", "sd15"),
    "dataset.source": ("hub", "folder", "synthetic"),
    "scheduler.name": ("ddpm", "ddim"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "logger.name": ("wandb", "none"),
    "train.nonfinite": ("stop", "skip"),
    "logger.mode": (None, "online", "offline", "disabled"),
}


def check_config(cfg: DictConfig) -> None:
    """Range and choice checks that types can't express. Raises ValueError naming the key."""
    errors = []
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            errors.append(f"{key}={value!r} is not one of {', '.join(map(repr, allowed))}")
    if cfg.lora.rank <= 0:
        errors.append(f"lora.rank must be > 0, got {cfg.lora.rank}")
    if cfg.lora.alpha <= 0:
        errors.append(f"lora.alpha must be > 0, got {cfg.lora.alpha}")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        errors.append(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    if not 0.0 <= cfg.dataset.holdout_fraction < 1.0:
        errors.append(f"dataset.holdout_fraction must be in [0, 1), got {cfg.dataset.holdout_fraction}")
    if cfg.dataset.resolution <= 0 or cfg.dataset.resolution % 8:
        errors.append(f"dataset.resolution must be a positive multiple of 8, got {cfg.dataset.resolution}")
    if cfg.dataset.source in ("hub", "folder") and not cfg.dataset.path:
        errors.append(f"dataset.path is required for dataset.source={cfg.dataset.source}")
    if cfg.dataset.source == "synthetic" and not cfg.dataset.num_images:
        errors.append("dataset.num_images is required for dataset.source=synthetic")
    t = cfg.train
    if t.max_steps is None and t.epochs is None:
        errors.append("set train.max_steps or train.epochs")
    for key in ("batch_size", "grad_accum"):
        if t[key] < 1:
            errors.append(f"train.{key} must be >= 1, got {t[key]}")
    for key in ("max_steps", "epochs"):
        if t[key] is not None and t[key] < 1:
            errors.append(f"train.{key} must be >= 1 or null, got {t[key]}")
    if t.lr <= 0:
        errors.append(f"train.lr must be > 0, got {t.lr}")
    if t.snr_gamma is not None and t.snr_gamma <= 0:
        errors.append(f"train.snr_gamma must be > 0 or null, got {t.snr_gamma}")
    for key in ("val_every", "sample_every", "checkpoint_every", "warmup_steps", "noise_offset"):
        if t[key] < 0:
            errors.append(f"train.{key} must be >= 0, got {t[key]}")
    if t.keep_checkpoints < 1:
        errors.append(f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    if t.log_every < 1:
        errors.append(f"train.log_every must be >= 1, got {t.log_every}")
    if cfg.scheduler.steps < 1:
        errors.append(f"scheduler.steps must be >= 1, got {cfg.scheduler.steps}")
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))

