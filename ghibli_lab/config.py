"""Typed schemas for the Hydra configs in ``conf/``.

Values live in YAML only (no defaults here, so the two can never disagree); these dataclasses fix
the keys and their types, so a typo or a wrong type fails at compose time. ``check_config`` adds the range checks that types can't
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
    pretrained: str = MISSING  # hub id, local directory, "tiny" or "random" (full size): random weights built in code
    vae: Optional[str] = MISSING  # optional VAE override, e.g. madebyollin/sdxl-vae-fp16-fix
    variant: Optional[str] = MISSING  # weight file variant on the hub, e.g. "fp16"


@dataclass
class DatasetConfig:
    name: str = MISSING
    source: str = MISSING  # "hub" | "folder" | "synthetic"
    path: Optional[str] = MISSING  # hub dataset id, or a local folder
    image_column: str = MISSING  # hub datasets only: column names
    caption_column: str = MISSING
    num_images: Optional[int] = MISSING  # cap on images used; synthetic: how many to generate
    style: Optional[str] = MISSING  # folder / synthetic: train on the subfolder <path>/<style> only (null: all of it)
    resolution: int = MISSING
    center_crop: bool = MISSING  # False: random crop
    random_flip: bool = MISSING
    caption_prefix: str = MISSING  # trigger prepended to every caption, e.g. "Still from the Anime, "
    default_caption: str = MISSING  # used when an image has no caption
    holdout_fraction: float = MISSING


@dataclass
class LoraConfig:
    rank: int = MISSING
    alpha: float = MISSING  # independent of rank; the effective scale is alpha / rank
    dropout: float = MISSING
    target_modules: list[str] = MISSING
    text_encoder: bool = MISSING  # also train LoRA on the text encoder(s), both on SDXL
    text_encoder_target_modules: list[str] = MISSING
    save_dtype: str = MISSING  # fp16 | bf16 | fp32: every method's exported files (training is always fp32)


@dataclass
class MethodConfig:
    """What is trained, and how (conf/method/). Every option fills every key; keys a method has
    no use for hold their neutral value (0, null, false), which check_config enforces."""

    name: str = MISSING  # label in tables and reports: lora | dora | full | dreambooth | textual_inversion
    weights: str = MISSING  # what trains: lora | dora (peft use_dora) | full (the UNet) | embeddings (new tokens)
    lr: Optional[float] = MISSING  # null: train.lr; else this method's learning rate (see conf/method/*.yaml)
    full_text_encoders: bool = MISSING  # weights=full: the text encoder(s) in full too
    trigger: str = MISSING  # prepended to every training caption, and to every prompt these weights sample
    prior_loss_weight: float = MISSING  # DreamBooth prior preservation (0 = off): weight of the class-image loss
    class_prompt: Optional[str] = MISSING  # prompt of the class images the base model generates
    num_class_images: int = MISSING
    token: Optional[str] = MISSING  # weights=embeddings: the new token (it must occur in trigger)
    init_word: Optional[str] = MISSING  # weights=embeddings: the new vectors start as this word's embedding
    num_vectors: int = MISSING  # weights=embeddings: vectors per token (<tok>, <tok>_1, ...)


@dataclass
class SchedulerConfig:
    name: str = MISSING  # "ddpm" | "ddim": the sampler; training keeps the model's own schedule
    steps: int = MISSING  # inference steps


@dataclass
class GuidanceConfig:
    scale: float = MISSING  # classifier-free guidance scale; 1 disables guidance


@dataclass
class TrainConfig:
    max_steps: Optional[int] = MISSING  # optimizer steps; null: use epochs
    epochs: Optional[int] = MISSING
    batch_size: int = MISSING
    grad_accum: int = MISSING
    lr: float = MISSING
    lr_scheduler: str = MISSING  # any name diffusers.optimization.get_scheduler knows
    optimizer: str = MISSING  # adamw | adamw8bit (bitsandbytes, CUDA only: the full fine-tune's memory saver)
    warmup_steps: int = MISSING
    adam_beta1: float = MISSING
    adam_beta2: float = MISSING
    adam_eps: float = MISSING
    weight_decay: float = MISSING
    max_grad_norm: float = MISSING
    mixed_precision: str = MISSING  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = MISSING
    compile: bool = MISSING  # torch.compile the UNet (first steps are slow while it compiles)
    channels_last: bool = MISSING  # UNet convolutions in channels_last memory format
    snr_gamma: Optional[float] = MISSING  # min-SNR-gamma loss weighting; 5.0 is the paper's value
    noise_offset: float = MISSING
    loss_guidance: float = MISSING  # experimental CFG-guided loss: uncond + g·(cond − uncond) vs the noise; 1 = standard
    early_stop_patience: Optional[int] = MISSING  # stop after this many validations without a better val/loss; null = off
    val_every: int = MISSING  # 0 = off
    val_timesteps: list[int] = MISSING
    sample_every: int = MISSING  # 0 = off; samples are always written at the end
    checkpoint_every: int = MISSING  # 0 = off
    keep_checkpoints: int = MISSING  # newest complete checkpoints kept
    resume: Optional[str] = MISSING  # null | auto (newest checkpoint in this run dir) | a checkpoint dir
    nonfinite: str = MISSING  # non-finite loss: stop (naming the batch's files) | skip the batch
    log_every: int = MISSING
    num_workers: int = MISSING
    cache: bool = MISSING  # shared latent/text-embedding cache (needs dataset.center_crop)


@dataclass
class SampleConfig:
    prompts: list[str] = MISSING
    seeds: list[int] = MISSING


@dataclass
class LoggerConfig:
    name: str = MISSING  # "wandb" | "none"
    project: Optional[str] = MISSING
    entity: Optional[str] = MISSING
    mode: Optional[str] = MISSING  # null: online if an API key is configured, else offline


@dataclass
class TrainRunConfig:
    name: str = MISSING
    seed: int = MISSING
    output_root: str = MISSING
    cache_dir: str = MISSING
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    lora: LoraConfig = MISSING
    method: MethodConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    guidance: GuidanceConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    logger: LoggerConfig = MISSING


@dataclass
class EvalConfig:
    features: str = MISSING  # inception | clip | tiny | auto (tiny for tiny models, else inception)
    scheduler: Optional[str] = MISSING  # ddpm | ddim; null: each run's own (scheduler.name)
    steps: Optional[int] = MISSING  # null: each run's own (scheduler.steps)
    images_per_prompt: int = MISSING  # per held-out caption, each at its own seed (1: N_fake = N_real)
    seed: int = MISSING
    resolution: Optional[int] = MISSING  # null: the run's training resolution
    kid_subset_size: int = MISSING  # clamped to N (and reported) when N is smaller
    clip_model: str = MISSING  # hub id or local dir
    inception_path: Optional[str] = MISSING  # null: <cache_dir>/features/inception-2015-12-05.pt
    bootstrap_draws: int = MISSING  # paired bootstrap draws for the LoRA - base intervals


@dataclass
class EvalGuidanceConfig:
    scale: Optional[float] = MISSING  # null: each run's own guidance.scale


@dataclass
class EvaluateRunConfig:
    run_dir: str = MISSING  # a run dir or a sweep dir
    cache_dir: Optional[str] = MISSING  # null: the run's own training cache_dir
    guidance: EvalGuidanceConfig = field(default_factory=EvalGuidanceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class GenerateConfig:
    """Schema of ``conf/generate.yaml``."""

    model: ModelConfig = MISSING
    scheduler: SchedulerConfig = MISSING  # the sampler and its steps
    run: Optional[str] = MISSING
    prompt: Optional[str] = MISSING
    prompts_file: Optional[str] = MISSING
    loras: list[str] = MISSING
    lora_scale: float = MISSING
    guidance_scale: float = MISSING
    seed: int = MISSING
    resolution: Optional[int] = MISSING
    caption_prefix: Optional[str] = MISSING
    blend: list[str] = MISSING
    blend_weights: list[float] = MISSING
    output_dir: str = MISSING


@dataclass
class ReportConfig:
    """Schema of ``conf/report.yaml``."""

    sweep_dir: str = MISSING  # a sweep dir (or a single run dir)
    eval_name: Optional[str] = MISSING  # null: <run>/eval/; else <run>/eval/<name>/ (an evaluate multirun)
    tile: int = MISSING  # px per image in the base-vs-LoRA grids
    max_columns: int = MISSING  # at most this many (prompt, seed) columns per grid
    wandb: bool = MISSING  # also log plots and grids to each run's W&B run


@dataclass
class BenchResolution:
    sdxl: int = MISSING
    sd15: int = MISSING
    tiny: int = MISSING  # size=tiny: both tiny models


@dataclass
class BenchConfig:
    """Schema of ``conf/bench.yaml``."""

    size: str = MISSING  # full | tiny
    models: list[str] = MISSING
    batch_sizes: list[int] = MISSING
    modes: list[str] = MISSING
    gradient_checkpointing: list[bool] = MISSING  # fast rows; reference: off
    compile: bool = MISSING  # torch.compile the UNet (fast rows)
    channels_last: bool = MISSING  # UNet in channels_last memory format (fast rows)
    warmup: int = MISSING  # untimed steps before the timed ones (absorb cuDNN autotuning, compilation)
    steps: int = MISSING  # timed steps
    resolution: BenchResolution = field(default_factory=BenchResolution)
    lora_rank: int = MISSING  # alpha = rank (scale 1), default target modules
    allow_cpu_full: bool = MISSING  # size=full without a GPU: refused unless true


def register_configs() -> None:
    ConfigStore.instance().store(name="bench_schema", node=BenchConfig)
    ConfigStore.instance().store(name="train_schema", node=TrainRunConfig)
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateRunConfig)
    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)
    ConfigStore.instance().store(name="report_schema", node=ReportConfig)
    if not OmegaConf.has_resolver("swept"):
        OmegaConf.register_new_resolver("swept", swept_values)
    if not OmegaConf.has_resolver("eval_output"):
        from ghibli_lab.runs import eval_output_dir  # paths only, no heavy imports

        OmegaConf.register_new_resolver("eval_output", eval_output_dir)
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


def swept_values(task_overrides: list[str], sweep_dir: str | None = None, _root_: Any = None) -> str:
    """``lora.alpha-4_lora.rank-8``: this job's values of the keys swept on the command line.

    Used to name sweep sub-dirs (``hydra.sweep.subdir``). Hydra's ``override_dirname`` holds every
    override, swept or not; which ones were swept is only visible in the original arguments.
    Launchers that run jobs in other processes (submitit) have other arguments; then the sweep's
    ``multirun.yaml``, which the launcher writes first, has them. A search space in the config
    (``hydra.sweeper.params``, e.g. ``hydra/sweeper=optuna``'s) counts as swept too. Falls back to
    all of this job's overrides when none of these can be read.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    swept = set()
    args = sys.argv[1:]
    multirun = Path(sweep_dir) / "multirun.yaml" if sweep_dir else None
    if multirun is not None and multirun.is_file():
        args = list(OmegaConf.load(multirun).hydra.overrides.task)
    params = OmegaConf.select(_root_, "hydra.sweeper.params") if _root_ is not None else None
    args = [*args, *(f"{key}={value}" for key, value in (params or {}).items())]
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
    "lora.save_dtype": ("fp16", "bf16", "fp32"),
    "method.weights": ("lora", "dora", "full", "embeddings"),
    "train.optimizer": ("adamw", "adamw8bit"),
    "logger.mode": (None, "online", "offline", "disabled"),
}


class ConfigError(ValueError):
    """A config value out of range: reported as one message, no traceback."""


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
    if cfg.dataset.style is not None and (cfg.dataset.source == "hub" or not re.fullmatch(r"[\w.-]+", cfg.dataset.style)):
        errors.append(f"dataset.style={cfg.dataset.style!r} must name a subfolder (letters, digits, . _ -) of a folder or synthetic dataset")
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
    if t.loss_guidance <= 0:
        errors.append(f"train.loss_guidance must be > 0 (1 = the standard loss), got {t.loss_guidance}")
    if t.early_stop_patience is not None and (t.early_stop_patience < 1 or t.val_every < 1):
        errors.append(
            f"train.early_stop_patience={t.early_stop_patience} needs a value >= 1 and validation "
            f"(train.val_every >= 1, got {t.val_every}), or null"
        )
    if t.keep_checkpoints < 1:
        errors.append(f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    if t.log_every < 1:
        errors.append(f"train.log_every must be >= 1, got {t.log_every}")
    if cfg.scheduler.steps < 1:
        errors.append(f"scheduler.steps must be >= 1, got {cfg.scheduler.steps}")
    errors += method_errors(cfg.method)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))



def method_errors(m: DictConfig) -> list[str]:
    """What a ``method`` config can't combine: prior preservation needs class images, embeddings
    need a token in the trigger, and the embedding and full-text-encoder keys must keep their
    neutral value elsewhere (a swept key that does nothing fails instead of silently training
    the same thing twice)."""
    errors = []
    if m.prior_loss_weight < 0 or m.num_class_images < 0:
        errors.append("method.prior_loss_weight and method.num_class_images must be >= 0")
    if m.prior_loss_weight > 0 and not (m.num_class_images > 0 and m.class_prompt):
        errors.append(
            "prior preservation (method.prior_loss_weight > 0) needs method.num_class_images > 0 and a "
            f"method.class_prompt (got {m.num_class_images}, {m.class_prompt!r})"
        )
    if m.weights == "embeddings":
        if not m.token or not m.init_word:
            errors.append("method.weights=embeddings needs method.token and method.init_word")
        elif m.token not in m.trigger:
            errors.append(f"method.token={m.token!r} must occur in method.trigger={m.trigger!r}, or no prompt uses it")
        if m.num_vectors < 1:
            errors.append(f"method.num_vectors must be >= 1, got {m.num_vectors}")
    elif m.token or m.init_word or m.num_vectors != 1:
        errors.append(f"method.token, method.init_word and method.num_vectors are for method.weights=embeddings, not {m.weights}")
    if m.lr is not None and m.lr <= 0:
        errors.append(f"method.lr must be > 0 or null, got {m.lr}")
    if m.full_text_encoders and m.weights != "full":
        errors.append(f"method.full_text_encoders is for method.weights=full, not {m.weights} (LoRA on the text encoders: lora.text_encoder)")
    return errors
