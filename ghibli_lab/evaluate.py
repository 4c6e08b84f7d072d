"""Held-out evaluation of trained LoRAs:  python -m ghibli_lab.evaluate run_dir=<run or sweep dir>

For every run: reload its own training config (so the held-out split, model and caption prefix are
the training ones), generate images for each held-out caption at fixed seeds with the LoRA and
with the base model, and compare both with the held-out images: KID (the headline at our sizes),
FID (clean-fid protocol, flagged when N < 2048), CLIP score, style similarity and the
fixed-timestep validation loss. Every number is stamped with the protocol that produced it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from importlib.metadata import version
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from ghibli_lab.adapters import loaded_adapter, without_adapter
from ghibli_lab.config import CONF_DIR, register_configs
from ghibli_lab.data import ImageCaptionDataset, load_image, load_split, prepare_image
from ghibli_lab.encode import encode_validation_set, eval_mode
from ghibli_lab.hub import OfflineError
from ghibli_lab.loss import validation_loss
from ghibli_lab.metrics import HEADLINE, METRICS, FeatureUnavailable, compute_image_metrics, fmt, load_feature_models
from ghibli_lab.pipeline import load_pipeline, training_scheduler
from ghibli_lab.runs import find_runs, load_run_config
from ghibli_lab.sampling import generate
from ghibli_lab.tracking import wandb_mode

log = logging.getLogger(__name__)
register_configs()

METRIC_KEYS = tuple(METRICS)  # what metrics.json holds per side, in the registry's order
BASE_CACHE_VERSION = 1  # bump when the way base images are generated changes
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "torchmetrics")


def evaluate(cfg: DictConfig, name: str | None = None) -> list[dict]:
    """Evaluate every run under ``cfg.run_dir``; write ``eval[/<name>]/metrics.json`` per run and,
    for a sweep, ``eval_table[_<name>].csv/.md`` beside the runs. Returns the metrics per run."""
    root = Path(cfg.run_dir).resolve()
    runs = find_runs(root)
    e = cfg.eval
    if e.images_per_prompt < 1 or e.steps < 1:
        raise ValueError("eval.images_per_prompt and eval.steps must be >= 1")
    if e.features not in ("auto", "inception", "clip", "tiny") or e.scheduler not in ("ddpm", "ddim"):
        raise ValueError(f"eval.features must be auto|inception|clip|tiny and eval.scheduler ddpm|ddim, got {e.features!r}, {e.scheduler!r}")
    seeds = [e.seed + i for i in range(e.images_per_prompt)]
    pipes, features, results = {}, {}, []
    for run in tqdm(runs, desc="evaluate", disable=len(runs) == 1):
        train_cfg = load_run_config(run)
        if not (run / "lora").is_dir():
            raise FileNotFoundError(f"{run} has no lora/ dir: did its training finish?")
        kind = e.features if e.features != "auto" else ("tiny" if train_cfg.model.pretrained == "tiny" else "inception")
        cache_dir = Path(cfg.cache_dir or train_cfg.cache_dir).resolve()
        if kind not in features:  # before any model loads, so a missing feature file fails fast
            features[kind] = load_feature_models(kind, cache_dir, clip_model=e.clip_model, inception_path=e.inception_path)
        fm = features[kind]

        # The same records training used: its preflight is deterministic, so the split is the same.
        holdout = load_split(train_cfg.dataset, train_cfg.cache_dir).holdout
        if not holdout:
            raise ValueError(f"{run}: the run held out no images (dataset.holdout_fraction=0); nothing to evaluate on")
        resolution = e.resolution or train_cfg.dataset.resolution
        settings = dict(scheduler=e.scheduler, steps=e.steps, guidance_scale=float(cfg.guidance.scale), resolution=resolution)
        prompts = [r.caption for r in holdout]
        prompt_per_image = [p for p in prompts for _ in seeds]
        real = torch.stack([to_uint8(prepare_image(load_image(r), resolution, True, False)[0]) for r in holdout])

        model_key = json.dumps(OmegaConf.to_container(train_cfg.model), sort_keys=True)
        if model_key not in pipes:
            pipes = {model_key: load_pipeline(train_cfg.model).to(device())}  # one model in memory at a time
        pipe = pipes[model_key]
        out_dir = run / "eval" / name if name else run / "eval"

        # Base images depend only on (model, split, sampling settings, seeds): generate them once
        # per sweep (and for later sweeps on the same data) from a content-keyed cache.
        base_key = cache_key(model_key, holdout, settings, seeds)
        base_dir = cache_dir / "eval_base" / base_key
        if not (base_dir / "done").exists():
            with eval_mode(pipe):
                write_pngs(generate(pipe, prompts, seeds, **settings), base_dir)
            (base_dir / "done").write_text(json.dumps({"prompts": prompts, "seeds": seeds, **settings}))
        base = read_pngs(base_dir)

        noise_scheduler = training_scheduler(pipe)
        val_timesteps, val_seed = list(train_cfg.train.val_timesteps), train_cfg.seed
        with loaded_adapter(pipe, run / "lora", adapter_name="candidate"):
            with eval_mode(pipe):
                write_pngs(generate(pipe, prompts, seeds, **settings), out_dir / "images" / "lora")
            # The training run's own batching, so the fixed noise and the number match its val/loss.
            val_set = ImageCaptionDataset(holdout, train_cfg.dataset.resolution, center_crop=True, random_flip=False)
            val_batches = encode_validation_set(pipe, val_set, train_cfg.train.batch_size)
            lora_val = validation_loss(pipe, val_batches, noise_scheduler, val_timesteps, val_seed)
            with without_adapter(pipe):
                base_val = validation_loss(pipe, val_batches, noise_scheduler, val_timesteps, val_seed)
        lora = read_pngs(out_dir / "images" / "lora")  # metrics on exactly what is on disk (8-bit PNG)

        metrics = {}
        for label, fake, val in (("lora", lora, lora_val), ("base", base, base_val)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # KID draws random subsets: same subsets for every run
                m = compute_image_metrics(real, fake, prompt_per_image, fm, kid_subset_size=e.kid_subset_size)
            metrics[label] = {k: m[k] for k in METRIC_KEYS if k in m} | {"val_loss": val}
        protocol = {
            "n_real": m["n_real"],
            "n_fake": m["n_fake"],
            "kid_subset_size": m["kid_subset_size"],
            "kid_subset_clamped": m["kid_subset_clamped"],
            "fid_warning": m["fid_n_warning"],
            "features": kind,
            "feature_models": fm.protocol,
            "resize": fm.protocol.get("resize"),
            "image_format": "PNG, 8-bit RGB; real images center-cropped to the resolution",
            **settings,
            "seeds": seeds,
            "prompts": "held-out captions (training caption prefix included)",
            "val_loss": f"unweighted MSE at timesteps {list(train_cfg.train.val_timesteps)}, fixed noise (seed {train_cfg.seed})",
            "base_images": str(base_dir),
            "versions": {lib: version(lib) for lib in LIBRARIES},
        }
        result = {"lora": metrics["lora"], "base": metrics["base"], "protocol": protocol}
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        log.info("%s: KID %.4g (base %.4g), N=%d", run.name, metrics["lora"]["kid"], metrics["base"]["kid"], m["n_fake"])
        update_wandb_summary(run, result, name)
        results.append({"run": run, **result})

    if len(runs) > 1 or runs[0] != root:
        write_tables(root, results, name)
    return results


def cache_key(model_key: str, holdout: list, settings: dict, seeds: list[int]) -> str:
    payload = json.dumps(
        {"v": BASE_CACHE_VERSION, "model": model_key, "holdout": [(r.key, r.caption) for r in holdout], **settings, "seeds": seeds},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float CHW -> uint8 CHW, as an 8-bit PNG would hold it."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def write_pngs(images: list[Image.Image], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i:04d}.png")
        image.save(paths[-1])
    return paths


def read_pngs(folder: Path) -> torch.Tensor:
    paths = sorted(folder.glob("*.png"))
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def write_tables(sweep_dir: Path, results: list[dict], name: str | None) -> None:
    """``eval_table.csv`` / ``.md``: one row per run plus one per distinct base model, by KID."""
    rows, seen_base = [], set()
    for r in results:
        rows.append({"run": r["run"].name, **r["lora"]})
        if r["protocol"]["base_images"] not in seen_base:
            seen_base.add(r["protocol"]["base_images"])
            rows.append({"run": "base model" if len(seen_base) == 1 else f"base model ({r['run'].name})", **r["base"]})
    rows.sort(key=lambda row: row[HEADLINE])
    stem = f"eval_table_{name}" if name else "eval_table"
    columns = ["run", *METRIC_KEYS]
    with open(sweep_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    p = results[0]["protocol"]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows),
        "",
        f"Sorted by KID (lower is better). N = {p['n_fake']} generated vs {p['n_real']} held-out images; "
        f"features: {p['features']}; KID subset size {p['kid_subset_size']}"
        + (" (clamped to N)" if p["kid_subset_clamped"] else "")
        + f"; {p['scheduler']}, {p['steps']} steps, guidance {p['guidance_scale']}, seeds {p['seeds']}.",
    ]
    if p["fid_warning"]:
        lines.append(f"FID warning: {p['fid_warning']}")
    (sweep_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s", sweep_dir / f"{stem}.md")


def update_wandb_summary(run: Path, result: dict, name: str | None) -> None:
    """Add ``eval/<metric>`` (and ``eval/base_<metric>``) to the run's own W&B summary."""
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        return
    ident = json.loads(summary_path.read_text()).get("wandb") or {}
    if not ident.get("id") or ident.get("mode") == "disabled":
        return
    import wandb

    prefix = f"eval/{name}/" if name else "eval/"
    values = {f"{prefix}{k}": v for k, v in result["lora"].items()}
    values |= {f"{prefix}base_{k}": v for k, v in result["base"].items()}
    values[f"{prefix}n"] = result["protocol"]["n_fake"]
    mode = ident["mode"] if ident["mode"] != "online" else wandb_mode(OmegaConf.create({"name": "wandb", "mode": None}))
    wb = wandb.init(
        id=ident["id"], project=ident.get("project"), entity=ident.get("entity"), resume="allow", mode=mode, dir=str(run),
        reinit="finish_previous",
    )
    try:
        wb.summary.update(values)
    finally:
        wb.finish()


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    name = Path(hc.runtime.output_dir).name if hc.mode == RunMode.MULTIRUN else None
    try:
        results = evaluate(cfg, name=name)
    except (FeatureUnavailable, OfflineError) as err:  # expected offline failures: the message, no trace
        raise SystemExit(f"ghibli_lab.evaluate: {err}") from None
    return min(r["lora"][HEADLINE] for r in results)


if __name__ == "__main__":
    main()
