"""Held-out evaluation of trained runs:  python -m ghibli_lab.evaluate run_dir=<run or sweep dir>

For every run, whatever its method (LoRA, DoRA, full fine-tune, DreamBooth, textual inversion):
reload its own training config (so the held-out split, model, caption prefix and trigger are the
training ones), generate images for each held-out caption at fixed seeds with the trained weights
(the "lora" side of metrics.json, prompted with the method's trigger) and with the base model, and compare both with the held-out images: KID (the headline at our sizes),
FID (clean-fid protocol, flagged when N < 2048), CLIP score, style similarity and the
fixed-timestep validation loss. Every number is stamped with the protocol that produced it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
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

from ghibli_lab.adapters import without_adapter
from ghibli_lab.card import write_model_card
from ghibli_lab.config import CONF_DIR, register_configs
from ghibli_lab.data import SPLIT_FILE, ImageCaptionDataset, load_image, load_split, prepare_image
from ghibli_lab.encode import encode_validation_set, eval_mode
from ghibli_lab.hub import BUILT_IN_CODE, OfflineError, model_fingerprint
from ghibli_lab.loss import validation_loss
from ghibli_lab.metrics import (
    HEADLINE,
    METRICS,
    FeatureUnavailable,
    Sample,
    best_run,
    interval_text,
    extract_features,
    fmt,
    load_feature_models,
    paired_differences,
    protocols_differ,
    sample_sizes,
    score,
    style_separation,
    summary_values,
)
from ghibli_lab.methods import applied, prompt_text, run_method, weights_dir
from ghibli_lab.pipeline import load_pipeline, training_scheduler
from ghibli_lab.runs import COST_COLUMNS, find_runs, holds_runs, load_run_config, run_costs
from ghibli_lab.sampling import generate
from ghibli_lab.tracking import log_side_run

log = logging.getLogger(__name__)
register_configs()

METRIC_KEYS = tuple(METRICS)  # what metrics.json holds per side, in the registry's order
BASE_CACHE_VERSION = 2  # bump when the way base images are generated changes
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "torchmetrics")


def evaluate(cfg: DictConfig, name: str | None = None) -> list[dict]:
    """Evaluate every run under ``cfg.run_dir``; write ``eval[/<name>]/metrics.json`` per run and,
    for a sweep, ``eval_table[_<name>].csv/.md`` beside the runs. Returns the metrics per run."""
    root = Path(cfg.run_dir).resolve()
    runs = find_runs(root)
    e = cfg.eval
    if e.images_per_prompt < 1 or (e.steps is not None and e.steps < 1) or e.bootstrap_draws < 100:
        raise ValueError("eval.images_per_prompt and eval.steps must be >= 1, eval.bootstrap_draws >= 100")
    if e.features not in ("auto", "inception", "clip", "tiny") or e.scheduler not in (None, "ddpm", "ddim"):
        raise ValueError(f"eval.features must be auto|inception|clip|tiny and eval.scheduler ddpm|ddim|null, got {e.features!r}, {e.scheduler!r}")
    unfinished = [run for run in runs if not weights_dir(run, load_run_config(run)).is_dir()]
    if len(unfinished) == len(runs):
        raise FileNotFoundError(
            f"{runs[0] if len(runs) == 1 else root}: no finished run (no trained weights: lora/, full/ or "
            "embeddings/): did training finish?"
        )
    for run in unfinished:
        log.warning("not evaluated: %s has no trained weights (its training did not finish)", run.name)
    runs = [run for run in runs if run not in unfinished]
    pipes, features, extracted, results = {}, {}, {}, []
    styles: dict[str, tuple[str, object]] = {}  # run -> (its dataset.style, its images' features)
    style_reals: dict[str, object] = {}  # style -> its held-out images' features
    for run in tqdm(runs, desc="evaluate", disable=len(runs) == 1):
        train_cfg = load_run_config(run)
        # Random-weight models (tiny, or full size built in code) make noise: tiny features suffice.
        kind = e.features if e.features != "auto" else ("tiny" if train_cfg.model.pretrained in BUILT_IN_CODE else "inception")
        cache_dir = Path(cfg.cache_dir or train_cfg.cache_dir).resolve()
        if kind not in features:  # before any model loads, so a missing feature file fails fast
            features[kind] = load_feature_models(kind, cache_dir, clip_model=e.clip_model, inception_path=e.inception_path, device=device())
        fm = features[kind]

        # The images training held out: recorded in the run dir (older runs: the same deterministic split).
        holdout = load_split(train_cfg.dataset, train_cfg.cache_dir, stored=run / SPLIT_FILE).holdout
        if len(holdout) < 2:
            raise ValueError(f"{run}: the run held out {len(holdout)} image(s); evaluation needs at least 2 (dataset.holdout_fraction)")
        resolution = e.resolution or train_cfg.dataset.resolution
        settings = sampling_settings(cfg, train_cfg, resolution)
        prompts = [r.caption for r in holdout]  # as trained: with the dataset's trigger prefix
        method = run_method(train_cfg)
        trained_prompts = [prompt_text(method, p) for p in prompts]  # and the method's trigger
        k = e.images_per_prompt
        # Independent samples: every image its own seed; LoRA and base share them, image for image.
        seeds = [[e.seed + i * k + j for j in range(k)] for i in range(len(prompts))]
        prompt_of = torch.arange(len(prompts)).repeat_interleave(k)
        prefix = train_cfg.dataset.caption_prefix
        clip_texts = [strip_prefix(prompts[i], prefix) for i in prompt_of.tolist()]
        real = torch.stack([to_uint8(prepare_image(load_image(r), resolution, True, False)[0]) for r in holdout])

        fingerprint = model_fingerprint(train_cfg.model)
        model_key = json.dumps(fingerprint, sort_keys=True)
        if model_key not in pipes:
            pipes = {model_key: load_pipeline(train_cfg.model).to(device())}  # one model in memory at a time
        pipe = pipes[model_key]
        out_dir = run / "eval" / name if name else run / "eval"

        # Base images depend only on (model weights, split, sampling settings, seeds, libraries,
        # device): generated once per sweep (and for later sweeps) into a content-keyed cache.
        base_key = cache_key(fingerprint, holdout, settings, seeds)
        base_dir = cache_dir / "eval_base" / base_key
        base_status = ensure_base_images(pipe, base_dir, prompts, seeds, settings, real)
        base = read_pngs(base_dir)

        noise_scheduler = training_scheduler(pipe)
        val_args = (noise_scheduler, list(train_cfg.train.val_timesteps), train_cfg.seed)
        # The training run's own batching, so the fixed noise and the number match its val/loss.
        val_set = ImageCaptionDataset(holdout, train_cfg.dataset.resolution, center_crop=True, random_flip=False)
        val_batches = encode_validation_set(pipe, val_set, train_cfg.train.batch_size)
        trained_batches = [{**b, "caption": [prompt_text(method, c) for c in b["caption"]]} for b in val_batches]
        with applied(pipe, weights_dir(run, train_cfg)):
            with eval_mode(pipe):
                write_pngs(generate(pipe, trained_prompts, seeds, **settings), out_dir / "images" / "lora", clear=True)
            lora_val = validation_loss(pipe, trained_batches, *val_args, per_sample=True)
            with without_adapter(pipe):
                base_val = validation_loss(pipe, val_batches, *val_args, per_sample=True)
        lora = read_pngs(out_dir / "images" / "lora")  # metrics on exactly what is on disk (8-bit PNG)

        # The held-out and base images are the same for every run of the sweep: extract once.
        if (kind, base_dir) not in extracted:
            extracted[(kind, base_dir)] = (extract_features(real, fm), extract_features(base, fm, texts=clip_texts))
        real_features, base_features = extracted[(kind, base_dir)]
        subset = min(e.kid_subset_size, len(real), len(lora))
        lora_features = extract_features(lora, fm, texts=clip_texts)
        if train_cfg.dataset.style is not None:
            styles[run.name] = (train_cfg.dataset.style, lora_features)
            style_reals.setdefault(train_cfg.dataset.style, real_features)
        samples = {
            side: Sample(
                real_features, features, prompt_of=prompt_of,
                val_loss=val[0], val_losses=val[1], kid_subset_size=subset, seed=e.seed,
            )
            for side, features, val in (
                ("lora", lora_features, lora_val),
                ("base", base_features, base_val),
            )
        }
        metrics = {side: score(sample) for side, sample in samples.items()}
        paired = paired_differences(samples["lora"], samples["base"], draws=e.bootstrap_draws, seed=e.seed)
        sizes = sample_sizes(len(real), len(lora), e.kid_subset_size)
        protocol = {
            "n_real": sizes["n_real"],
            "n_fake": sizes["n_fake"],
            "images_per_prompt": k,
            "kid_subset_size": sizes["kid_subset_size"],
            "kid_subset_clamped": sizes["kid_subset_clamped"],
            "kid_subsets": samples["lora"].kid_subsets,
            "kid_kernel": "polynomial (x·y/d + 1)^3",
            "fid_warning": sizes["fid_n_warning"],
            "features": kind,
            "feature_models": fm.protocol,
            "feature_device": str(device()),
            "resize": fm.protocol.get("resize"),
            "image_format": "PNG, 8-bit RGB; real images center-cropped to the resolution",
            **settings,
            "seed": e.seed,
            "seeds": "per image: eval.seed + prompt index x images_per_prompt + j; LoRA and base on the same seeds",
            "prompts": "held-out captions (training caption prefix included)",
            "method": method.name,
            "trigger": method.trigger,  # on the trained side's prompts only
            "clip_text": f"held-out captions without the trigger prefix {prefix!r}" if prefix else "held-out captions",
            "val_loss": f"unweighted MSE at timesteps {list(train_cfg.train.val_timesteps)}, fixed noise (seed {train_cfg.seed})",
            "metrics": {k: m.note for k, m in METRICS.items() if m.note},
            "paired": f"LoRA - base, {e.bootstrap_draws} paired bootstrap draws over the held-out prompts, 95% percentile interval",
            "device": str(device()),
            "dtype": "float32",
            "lora_scale": train_cfg.lora.alpha / train_cfg.lora.rank if method.weights in ("lora", "dora") else None,
            "base_images": str(base_dir),
            "base_images_status": base_status,
            "versions": library_versions(),
        }
        result = {"lora": metrics["lora"], "base": metrics["base"], "paired": paired, "protocol": protocol}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        if not name:  # the model card shows the default evaluation's held-out metrics
            write_model_card(run)
        d = paired.get(HEADLINE, {})
        log.info(
            "%s: KID %.4g (base %.4g; LoRA - base %.3g [%.3g, %.3g]), N=%d",
            run.name, metrics["lora"][HEADLINE], metrics["base"][HEADLINE], d.get("diff", math.nan),
            d.get("low", math.nan), d.get("high", math.nan), sizes["n_fake"],
        )
        log_evaluation(run, result, name)
        results.append({"run": run, **result})

    if len(runs) > 1 or runs[0] != root:
        write_tables(root, results, name, unfinished)
        if len(style_reals) >= 2:  # a multi-style sweep: which style did each adapter learn?
            write_style_matrix(root, style_separation(styles, style_reals, e.bootstrap_draws, e.seed), name)
    return results


def write_style_matrix(sweep_dir: Path, matrix: dict, name: str | None) -> None:
    """``style_matrix[_<name>].json`` / ``.md``: every adapter's images against every style's
    held-out images (the report draws it)."""
    stem = f"style_matrix_{name}" if name else "style_matrix"
    (sweep_dir / f"{stem}.json").write_text(json.dumps(matrix, indent=2))
    styles = matrix["styles"]
    lines = [
        "Style separation: KID of each run's generated images against each style's held-out images "
        "(lower = closer; 95% bootstrap interval). The run's own style is in bold.",
        "",
        "| run (trained on) | " + " | ".join(styles) + " | own style lowest |",
        "|" + "---|" * (len(styles) + 2),
    ]
    for run, row in matrix["runs"].items():
        cells = []
        for style in styles:
            c = row["kid"][style]
            text = f"{c['kid']:.4g} [{c['low']:.3g}, {c['high']:.3g}]"
            cells.append(f"**{text}**" if style == row["style"] else text)
        verdict = "yes, clearly" if row["clearly"] else "yes" if row["lowest_is_own"] else "no"
        lines.append(f"| {run} ({row['style']}) | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", "clearly: the own-style interval lies below every other style's interval."]
    (sweep_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s", sweep_dir / f"{stem}.md")


def sampling_settings(cfg: DictConfig, train_cfg: DictConfig, resolution: int) -> dict:
    """How a run's evaluation images are sampled: as set on the evaluate command line, else as
    the run itself was configured to sample (its scheduler, steps and guidance)."""
    return dict(
        scheduler=cfg.eval.scheduler or train_cfg.scheduler.name,
        steps=cfg.eval.steps or train_cfg.scheduler.steps,
        guidance_scale=float(cfg.guidance.scale if cfg.guidance.scale is not None else train_cfg.guidance.scale),
        resolution=resolution,
    )


def strip_prefix(caption: str, prefix: str) -> str:
    """The caption without the trigger prefix training added (CLIP scores what the image shows)."""
    return caption[len(prefix):] if prefix and caption.startswith(prefix) else caption


def library_versions() -> dict[str, str]:
    return {lib: version(lib) for lib in LIBRARIES}


def cache_key(fingerprint: dict, holdout: list, settings: dict, seeds: list[list[int]]) -> str:
    """Content key of a set of base images: everything they depend on."""
    payload = json.dumps(
        {
            "v": BASE_CACHE_VERSION,
            "model": fingerprint,
            "holdout": [(r.key, r.caption) for r in holdout],
            **settings,
            "seeds": seeds,
            "versions": library_versions(),
            "device": device().type,
            "dtype": "float32",
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def ensure_base_images(pipe, base_dir: Path, prompts: list[str], seeds: list[list[int]], settings: dict, real: torch.Tensor) -> str:
    """Generate the base model's images into ``base_dir`` unless a complete set is there, with the
    held-out images as evaluated in ``real/`` (for the report's grids). Written into a temp dir and
    renamed, so a concurrent evaluation never reads a half-written set."""
    if (base_dir / "done").is_file():
        log.info("base images: reused from %s", base_dir.name)
        return "reused"
    tmp = base_dir.with_name(f".{base_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with eval_mode(pipe), without_adapter(pipe):
        write_pngs(generate(pipe, prompts, seeds, **settings), tmp)
    write_pngs([Image.fromarray(image.permute(1, 2, 0).numpy()) for image in real], tmp / "real")
    (tmp / "done").write_text(json.dumps({"prompts": prompts, "seeds": seeds, **settings}))
    try:
        os.rename(tmp, base_dir)
    except OSError:  # another evaluation finished the same set first: use that one
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("base images: reused from %s (written by a concurrent evaluation)", base_dir.name)
        return "reused"
    log.info("base images: generated into %s", base_dir)
    return "generated"


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float CHW -> uint8 CHW, as an 8-bit PNG would hold it."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def write_pngs(images: list[Image.Image], folder: Path, clear: bool = False) -> list[Path]:
    """``0000.png``, ``0001.png``, ... in ``folder``; ``clear`` first removes any older PNGs there."""
    if clear:
        for old in folder.glob("*.png"):
            old.unlink()
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


def write_tables(sweep_dir: Path, results: list[dict], name: str | None, unfinished: list[Path] = ()) -> None:
    """``eval_table.csv`` / ``.md``: one row per run plus one per distinct base model, by KID, each
    row with its N and sampling protocol; LoRA − base with its 95% interval per run; the best run
    only where that interval says it beats its base."""
    shown = [k for k, m in METRICS.items() if m.in_table]
    rows, seen_base = [], set()
    for r in results:
        p = r["protocol"]
        stamp = {k: p[k] for k in ("n_real", "n_fake", "features", "scheduler", "steps", "guidance_scale", "images_per_prompt")}
        diffs = {}
        for k in shown:
            d = r["paired"].get(k)
            diffs |= {f"{k}_diff": d and d["diff"], f"{k}_diff_low": d and d["low"], f"{k}_diff_high": d and d["high"]}
        summary_path = r["run"] / "summary.json"
        costs = run_costs(json.loads(summary_path.read_text()) if summary_path.is_file() else {})
        rows.append({"run": r["run"].name, **costs, **stamp, **r["lora"], **diffs})
        if p["base_images"] not in seen_base:
            seen_base.add(p["base_images"])
            rows.append({"run": "base model" if len(seen_base) == 1 else f"base model ({r['run'].name})", **stamp, **r["base"]})
    rows.sort(key=lambda row: math.inf if row.get(HEADLINE) is None else row[HEADLINE])
    stem = f"eval_table_{name}" if name else "eval_table"
    stamp_keys = ["n_real", "n_fake", "features", "scheduler", "steps", "guidance_scale", "images_per_prompt"]
    columns = ["run", *COST_COLUMNS, *stamp_keys, *METRIC_KEYS, *(f"{k}_diff{s}" for k in shown for s in ("", "_low", "_high"))]
    with open(sweep_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)

    by_name = {r["run"].name: r for r in results}
    best = best_run(by_name)
    md_columns = ["run", "method", "N", *shown]
    lines = [
        "| " + " | ".join(md_columns) + " |",
        "|" + "---|" * len(md_columns),
        *(
            "| " + " | ".join(
                [("★ " if row["run"] == best else "") + row["run"], row.get("method") or "-", f"{row['n_fake']} vs {row['n_real']}"]
                + [fmt(row.get(c)) if row.get(c) is not None else "-" for c in shown]
            ) + " |"
            for row in rows
        ),
        "",
        "What each run cost (from its summary.json; peak memory: " + cost_memory_note(results) + "):",
        "",
        "| run | " + " | ".join(list(COST_COLUMNS.values())) + " |",
        "|" + "---|" * (len(COST_COLUMNS) + 1),
        *(
            f"| {row['run']} | " + " | ".join(fmt(row.get(c)) if row.get(c) is not None else "-" for c in COST_COLUMNS) + " |"
            for row in rows
            if "method" in row
        ),
        "",
        f"Sorted by KID (lower is better). N = generated vs held-out images. "
        + (f"★ {best}: its LoRA − base interval on KID excludes 0 in the better direction, and its KID is the lowest of those."
           if best else "No run is distinguishable from its base model on KID: every LoRA − base interval includes 0 or favours the base."),
        "",
        "LoRA − base, 95% paired bootstrap interval over held-out prompts (negative is better for KID, FID, CMMD, val loss):",
        "",
        "| run | " + " | ".join(shown) + " |",
        "|" + "---|" * (len(shown) + 1),
        *(
            f"| {r['run'].name} | " + " | ".join(
                (interval_text(r["paired"][k]) + (" ✓" if r["paired"][k]["better"] else " ✗" if r["paired"][k]["worse"] else ""))
                if k in r["paired"] else "-" for k in shown
            ) + " |"
            for r in results
        ),
        "",
        "✓ interval excludes 0 in the better direction; ✗ in the worse direction.",
    ]
    p = results[0]["protocol"]
    lines.append(
        f"Features: {p['features']}; KID subset size {p['kid_subset_size']}" + (" (clamped to N)" if p["kid_subset_clamped"] else "")
        + f"; {p['scheduler']}, {p['steps']} steps, guidance {p['guidance_scale']}, {p['images_per_prompt']} image(s) per prompt, "
        f"seed {p['seed']} ({p['seeds']})."
    )
    if protocols_differ([r["protocol"] for r in results]):
        lines.append("WARNING: the runs were evaluated under different protocols (see each row's N and settings); compare like with like.")
    if p["fid_warning"]:
        lines.append(f"FID warning: {p['fid_warning']}")
    if unfinished:
        lines.append("Not evaluated (no trained weights: training did not finish): " + ", ".join(r.name for r in unfinished))
    (sweep_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s", sweep_dir / f"{stem}.md")


def cost_memory_note(results: list[dict]) -> str:
    sources = set()
    for r in results:
        path = r["run"] / "summary.json"
        if path.is_file():
            sources.add(json.loads(path.read_text()).get("peak_memory_source"))
    return ", ".join(sorted(s for s in sources if s)) or "not recorded"


def log_evaluation(run: Path, result: dict, name: str | None) -> bool:
    """The evaluation as its own W&B run (job_type "eval") in the training run's group."""
    values = summary_values(result, name)
    p = result["protocol"]
    config = {k: p[k] for k in ("features", "scheduler", "steps", "guidance_scale", "resolution", "images_per_prompt", "seed", "n_real", "n_fake")}
    return log_side_run(run, "eval", values, config)


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    name = Path(hc.runtime.output_dir).name if hc.mode == RunMode.MULTIRUN else None
    root = Path(cfg.run_dir)
    if not holds_runs(root):  # Hydra's output went to a temp dir (conf/evaluate.yaml): nothing written here
        shutil.rmtree(hc.runtime.output_dir, ignore_errors=True)
        why = "does not exist" if not root.exists() else "is neither a run dir nor a sweep dir (no .hydra/config.yaml)"
        raise SystemExit(f"ghibli_lab.evaluate: run_dir={cfg.run_dir} {why}")
    try:
        results = evaluate(cfg, name=name)
    except (FeatureUnavailable, OfflineError, FileNotFoundError, ValueError) as err:  # bad input: the message, no trace
        raise SystemExit(f"ghibli_lab.evaluate: {err}") from None
    return min(r["lora"][HEADLINE] for r in results)


if __name__ == "__main__":
    main()
