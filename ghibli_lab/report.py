"""Sweep report:  python -m ghibli_lab.report sweep_dir=<sweep or run dir>

Reads what training and evaluation left in a sweep dir and writes ``<sweep_dir>/report/index.html``,
a self-contained page (PNG files beside it, no scripts, nothing fetched) with:

- the evaluation table with each run's N and its LoRA − base intervals (the best run marked only
  where its interval says it beats the base), the base model's row, and the protocol that produced
  every number; or, before ``ghibli_lab.evaluate`` has run, a note saying so;
- one heatmap per metric over the two swept keys, found from the run dir names (``3_lora.alpha=8,
  lora.rank=8``) and the runs' configs: a bar chart for one swept key, one panel per value of any
  further keys;
- every run's held-out ``val/loss`` curve in one plot;
- per run, base vs LoRA at the same prompts and seeds: the evaluation images when present, else
  ``samples/final.png``.

The same plots and each run's grid also go to that run's own W&B run (reopened by the id in its
``summary.json``), with the config flattened (``lora.rank``, ``lora.alpha``, ...) to top-level keys
so W&B's parallel-coordinates and scatter panels can set them against the eval metrics.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

import hydra
import matplotlib

matplotlib.use("Agg")  # files only, never a window; set before anything imports pyplot

from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402
from PIL import Image  # noqa: E402

from ghibli_lab.config import CONF_DIR, register_configs  # noqa: E402
from ghibli_lab.metrics import HEADLINE, METRICS, best_run, fmt, protocols_differ, summary_values  # noqa: E402
from ghibli_lab.runs import COST_COLUMNS, find_runs, load_run_config, run_costs  # noqa: E402
from ghibli_lab.sampling import image_grid  # noqa: E402
from ghibli_lab.tracking import log_side_run  # noqa: E402

log = logging.getLogger(__name__)
register_configs()

# Evaluation metrics as evaluate.py writes them (the registry in metrics.py): key -> (label, lower is better).
EVAL_METRICS = {k: (m.label, m.lower_is_better) for k, m in METRICS.items() if m.in_table}
# Before evaluation, the one number every run has: its final held-out loss from training.
TRAIN_METRICS = {"val/loss": ("final val/loss (training)", True)}




@dataclass
class Run:
    """Everything the report reads from one run dir."""

    path: Path
    config: dict[str, Any]  # the run's .hydra/config.yaml, flattened to dotted keys
    overrides: dict[str, str]  # swept key -> value as the dir name spells it (set by swept_keys)
    summary: dict[str, Any]  # summary.json ({} if training did not finish)
    curve: list[tuple[int, float]]  # (step, val/loss) from metrics.jsonl
    eval: Optional[dict[str, Any]]  # eval[/<name>]/metrics.json, or None
    eval_dir: Path

    @property
    def name(self) -> str:
        return self.path.name


def report(cfg: DictConfig) -> Path:
    """Write ``<sweep_dir>/report/index.html`` (and its PNGs) and log to W&B; return the HTML path."""
    if cfg.tile < 8 or cfg.max_columns < 1:
        raise ValueError(f"tile must be >= 8 and max_columns >= 1, got {cfg.tile}, {cfg.max_columns}")
    root = Path(cfg.sweep_dir).resolve()
    try:
        paths = find_runs(root)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"sweep_dir={cfg.sweep_dir} is neither a sweep dir nor a run dir (no */.hydra/config.yaml)"
        ) from None
    runs = [load_run(path, cfg.eval_name) for path in paths]
    out = root / "report"
    (out / "grids").mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.png"), *(out / "grids").glob("*.png")]:
        stale.unlink()  # a previous report's plots (e.g. the training-only heatmap before eval)

    keys = swept_keys(runs)
    evaluated = [r for r in runs if r.eval]
    metrics = EVAL_METRICS if evaluated else TRAIN_METRICS
    plots: dict[str, Path] = {}
    for metric, (label, lower) in metrics.items():
        values = {r.name: metric_value(r, metric) for r in runs}
        if all(math.isnan(v) for v in values.values()):
            continue
        base = base_value(evaluated, metric) if evaluated else None
        plots[plot_name(metric)] = plot_metric(runs, keys, values, label, lower, base, out / f"{plot_name(metric)}.png")
    curves = plot_val_curves(runs, out / "val_loss_curves.png")
    if curves:
        plots["val_loss_curves"] = curves
    grids = {r.name: run_grid(r, cfg.tile, cfg.max_columns, out / "grids" / f"{slug(r.name)}.png") for r in runs}

    index = out / "index.html"
    index.write_text(render_html(root, runs, keys, metrics, plots, grids, cfg.eval_name))
    log.info("report: %s", index)

    if cfg.wandb:
        for r in runs:
            images = dict(plots)
            if grids[r.name]:
                images["grid"] = grids[r.name]["path"]
            log_to_wandb(r, images, cfg.eval_name)
    return index


# ----------------------------------------------------------------------------------------------
# Reading runs


def load_run(path: Path, eval_name: Optional[str]) -> Run:
    cfg = load_run_config(path)
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # e.g. an ${oc.env:...} that is unset here
        container = OmegaConf.to_container(cfg, resolve=False)
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    curve = []
    metrics_path = path / "metrics.jsonl"
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if "val/loss" in row and row["val/loss"] is not None:
                curve.append((int(row["step"]), float(row["val/loss"])))  # "nan" strings -> nan
    eval_dir = path / "eval" / eval_name if eval_name else path / "eval"
    eval_path = eval_dir / "metrics.json"
    result = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    return Run(path, flatten(container), {}, summary, sorted(curve), result, eval_dir)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"rank": 4}}`` -> ``{"lora.rank": 4}``; lists stay values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def name_overrides(name: str, candidates: set[str]) -> dict[str, str]:
    """The swept values in a sweep sub-dir name: ``3_lora.alpha-8_lora.rank-8`` (or the older
    ``3_lora.alpha=8,lora.rank=8``) -> ``{"lora.alpha": "8", "lora.rank": "8"}``.

    Keys hold "_" themselves (``train.max_steps``), so the name can't be split blindly: look for the
    ``candidates`` (keys that differ between the runs, and their groups) where a token starts."""
    number, sep, rest = name.partition("_")
    if not (sep and number.isdigit()):
        return {}
    hits = sorted(
        (m.start(1), key)
        for key in candidates
        for m in re.finditer(r"(?:^|[_,])(" + re.escape(key) + r")[-=]", rest)
    )
    pairs = {}
    for i, (start, key) in enumerate(hits):
        end = hits[i + 1][0] - 1 if i + 1 < len(hits) else len(rest)  # up to the next key's separator
        pairs[key] = rest[start + len(key) + 1 : end]
    return pairs


def axis_value(run: Run, key: str) -> Any:
    """The run's value of a swept key: typed from its config, or (for a config group choice such
    as ``lora=r4a8``, which is no single config value) as its dir name spells it."""
    value = run.config[key] if key in run.config else run.overrides.get(key)
    return tuple(value) if isinstance(value, list) else value


def swept_keys(runs: list[Run]) -> list[str]:
    """The swept keys, in the order the run dir names give them (and each run's ``overrides``
    from its name): keys whose values differ across runs and appear in the names. A swept config
    group (``lora-r4a8``) is one key, standing for the keys inside it. Keys that differ but are not
    in the names (a logger setting, say) are no axis; only when the names give none (dirs not named
    by ``train -m``) is every differing key one."""
    if len(runs) < 2:
        return []
    all_keys = sorted(set().union(*(r.config for r in runs)))
    varying = [k for k in all_keys if len({json.dumps(r.config.get(k), sort_keys=True, default=str) for r in runs}) > 1]
    groups = {".".join(k.split(".")[:i]) for k in varying for i in range(1, k.count(".") + 1)}
    for r in runs:
        r.overrides = name_overrides(r.name, set(varying) | groups)
    named: list[str] = []
    for r in runs:
        named += [k for k in r.overrides if k not in named]
    return named or varying


def metric_value(run: Run, metric: str) -> float:
    if metric in EVAL_METRICS:
        value = (run.eval or {}).get("lora", {}).get(metric)
    else:
        value = run.summary.get(metric)
    return float(value) if value is not None else math.nan


def base_value(evaluated: list[Run], metric: str) -> Optional[float]:
    values = {r.eval["protocol"].get("base_images"): r.eval["base"].get(metric) for r in evaluated}
    if len(values) != 1:  # several base models (a model sweep): no single reference line
        return None
    (value,) = values.values()
    return float(value) if value is not None else None


def plot_name(metric: str) -> str:
    """``heatmap_kid``; the training loss as ``heatmap_train_val_loss`` (not the eval ``val_loss``)."""
    return f"heatmap_{slug(metric)}" if metric in EVAL_METRICS else f"heatmap_train_{slug(metric)}"


def slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "run"


def sort_key(value: Any) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(map(show, value)) + "]"
    return fmt(value) if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib's object API on the Agg backend: no pyplot state between calls)


def plot_metric(
    runs: list[Run],
    keys: list[str],
    values: dict[str, float],
    label: str,
    lower: bool,
    base: Optional[float],
    path: Path,
) -> Path:
    """A heatmap over the first two swept keys (a panel per value of any further keys), a bar
    chart for one swept key (or none), each cell annotated with its value, the best one outlined."""
    finite = [v for v in values.values() if not math.isnan(v)]
    best = (min if lower else max)(finite)
    title = f"{label} ({'lower' if lower else 'higher'} is better)"
    if base is not None:
        title += f"\nbase model {fmt(base)}"
    if len(set(finite)) == 1 and len(finite) > 1:
        title += " (the same for every run)"
    if len(keys) >= 2:
        fig = heatmap(runs, keys, values, lower, best)
    else:
        fig = bars(runs, keys, values, lower, best, base)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def heatmap(runs: list[Run], keys: list[str], values: dict[str, float], lower: bool, best: float) -> Figure:
    x_key, y_key, facet_keys = keys[0], keys[1], keys[2:]
    xs = sorted({axis_value(r, x_key) for r in runs}, key=sort_key)
    ys = sorted({axis_value(r, y_key) for r in runs}, key=sort_key)
    facets = sorted({tuple(axis_value(r, k) for k in facet_keys) for r in runs}, key=lambda f: [sort_key(v) for v in f])
    grids = {f: [[math.nan] * len(xs) for _ in ys] for f in facets}
    for r in runs:
        f = tuple(axis_value(r, k) for k in facet_keys)
        grids[f][ys.index(axis_value(r, y_key))][xs.index(axis_value(r, x_key))] = values[r.name]
    finite = [v for v in values.values() if not math.isnan(v)]
    lo, hi = min(finite), max(finite)
    norm = Normalize(lo - 1, hi + 1) if lo == hi else Normalize(lo, hi)
    cmap = matplotlib.colormaps["viridis_r" if lower else "viridis"]  # the best end is yellow
    fig = Figure(figsize=(0.9 + len(facets) * (1.2 + 1.1 * len(xs)), 1.6 + 0.8 * len(ys)), layout="constrained")
    axes = fig.subplots(1, len(facets), squeeze=False)[0]
    for ax, facet in zip(axes, facets):
        grid = grids[facet]
        image = ax.imshow(grid, cmap=cmap, norm=norm, origin="lower", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if math.isnan(v):
                    ax.text(j, i, "-", ha="center", va="center", color="grey")
                    continue
                r, g, b, _ = cmap(norm(v))
                ax.text(j, i, fmt(v), ha="center", va="center", fontsize=9,
                        color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
                if v == best and lo != hi:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
        ax.set_xticks(range(len(xs)), [show(x) for x in xs])
        ax.set_yticks(range(len(ys)), [show(y) for y in ys])
        ax.set_xlabel(x_key)
        ax.set_ylabel(y_key)
        if facet_keys:
            ax.set_title(", ".join(f"{k}={show(v)}" for k, v in zip(facet_keys, facet)), fontsize=9)
    if lo != hi:
        fig.colorbar(image, ax=list(axes), shrink=0.9)
    return fig


def bars(runs: list[Run], keys: list[str], values: dict[str, float], lower: bool, best: float, base: Optional[float]) -> Figure:
    if keys:
        points = sorted(((axis_value(r, keys[0]), values[r.name]) for r in runs), key=lambda p: sort_key(p[0]))
        labels, heights, xlabel = [show(p[0]) for p in points], [p[1] for p in points], keys[0]
    else:  # one run, or runs that differ in nothing the config shows
        labels, heights, xlabel = [r.name for r in runs], [values[r.name] for r in runs], "run"
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * len(labels)), 3.6), layout="constrained")
    ax = fig.subplots()
    unique = len({h for h in heights if not math.isnan(h)}) > 1
    colors = ["tab:orange" if h == best and unique else "tab:blue" for h in heights]
    drawn = ax.bar(range(len(labels)), [0 if math.isnan(h) else h for h in heights], color=colors)
    ax.bar_label(drawn, labels=["-" if math.isnan(h) else fmt(h) for h in heights], fontsize=9)
    if base is not None:
        ax.axhline(base, color="black", linestyle="--", linewidth=1, label="base model")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=0 if keys else 30, ha="center" if keys else "right")
    ax.set_xlabel(xlabel)
    ax.margins(y=0.15)
    return fig


def plot_val_curves(runs: list[Run], path: Path) -> Optional[Path]:
    """Every run's held-out loss against the step, one line each, in one plot."""
    if not any(r.curve for r in runs):
        return None
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    for r in runs:
        if r.curve:
            steps, losses = zip(*r.curve)
            ax.plot(steps, losses, marker="o", markersize=3, label=r.name)
    ax.set_xlabel("step")
    ax.set_ylabel("val/loss")
    ax.set_title("held-out loss at fixed timesteps and noise (step 0 = base model)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


# ----------------------------------------------------------------------------------------------
# Base-vs-LoRA grids


def run_grid(run: Run, tile: int, max_columns: int, path: Path) -> Optional[dict[str, Any]]:
    """Base row over LoRA row at the same prompts and seeds; returns the path and what it shows."""
    protocol = (run.eval or {}).get("protocol")
    if protocol:
        base_dir = find_base_images(protocol.get("base_images"), run.path)
        lora_paths = sorted((run.eval_dir / "images" / "lora").glob("*.png"))
        if base_dir and lora_paths:
            base_paths = sorted(base_dir.glob("*.png"))
            n = min(len(base_paths), len(lora_paths), max_columns)
            done = base_dir / "done"  # evaluate.py writes the prompts and seeds of the cached base images
            meta = json.loads(done.read_text()) if done.is_file() else {"prompts": [], "seeds": []}
            seeds = meta["seeds"]
            if seeds and not isinstance(seeds[0], list):  # older evaluations: the same seeds for every prompt
                seeds = [seeds] * len(meta["prompts"])
            columns = [{"prompt": p, "seed": s, "index": i} for i, (p, ss) in enumerate(zip(meta["prompts"], seeds)) for s in ss]
            rows = [[thumbnail(Image.open(p), tile) for p in paths[:n]] for paths in (base_paths, lora_paths)]
            labels = ["base", trained_label(run)]
            real_paths = sorted((base_dir / "real").glob("*.png"))
            if real_paths and len(columns) >= n:  # the held-out image of each column's caption, on top
                rows.insert(0, [thumbnail(Image.open(real_paths[c["index"]]), tile) for c in columns[:n]])
                labels.insert(0, "held out")
            image_grid(rows, labels=labels).save(path)
            source = (
                f"evaluation images ({', '.join(labels)}): {protocol['scheduler']}, {protocol['steps']} steps, "
                f"guidance {protocol['guidance_scale']}; first {n} of {len(lora_paths)}"
            )
            columns = [{"prompt": c["prompt"], "seed": c["seed"]} for c in columns]
            return {"path": path, "source": source, "columns": columns[:n]}
    final = run.path / "samples" / "final.png"
    if not final.is_file():
        return None
    image = Image.open(final).convert("RGB")
    meta_path = final.with_suffix(".json")
    if not meta_path.is_file():
        image.save(path)
        return {"path": path, "source": "samples/final.png (top: base, bottom: LoRA)", "columns": []}
    meta = json.loads(meta_path.read_text())
    res, columns = meta["resolution"], meta["columns"]
    label_w = image.width - res * len(columns)  # the label strip sampling.image_grid adds on the left
    n = min(len(columns), max_columns)
    rows = [
        [thumbnail(image.crop((label_w + j * res, i * res, label_w + (j + 1) * res, (i + 1) * res)), tile) for j in range(n)]
        for i in range(len(meta["rows"]))
    ]
    image_grid(rows, labels=["base" if r == "base" else trained_label(run) for r in meta["rows"]]).save(path)
    source = (
        f"training samples (samples/final.png): {meta['scheduler']}, {meta['steps']} steps, "
        f"guidance {meta['guidance_scale']}; first {n} of {len(columns)}"
    )
    return {"path": path, "source": source, "columns": columns[:n]}


def trained_label(run: Run) -> str:
    """The trained row's label in grids: the run's method (LoRA for runs before the method axis)."""
    method = run.summary.get("method", "lora")
    return {"lora": "LoRA", "dora": "DoRA"}.get(method, method)


def find_base_images(recorded: Optional[str], run_dir: Path) -> Optional[Path]:
    """The base-image cache dir named in the protocol. A relative path is relative to wherever
    evaluation ran, usually the project dir above ``outputs/``: try the cwd, then the run's parents."""
    if not recorded:
        return None
    recorded_path = Path(recorded)
    if recorded_path.is_absolute():
        return recorded_path if recorded_path.is_dir() else None
    for root in (Path.cwd(), *run_dir.parents):
        if (root / recorded_path).is_dir():
            return root / recorded_path
    return None


def thumbnail(image: Image.Image, tile: int) -> Image.Image:
    """Scale to ``tile`` px wide: nearest-neighbour when enlarging (tiny models' 64 px images
    stay crisp), Lanczos when shrinking."""
    image = image.convert("RGB")
    if image.width == tile:
        return image
    resample = Image.Resampling.NEAREST if tile > image.width else Image.Resampling.LANCZOS
    return image.resize((tile, max(1, round(image.height * tile / image.width))), resample)


# ----------------------------------------------------------------------------------------------
# HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f2f2f2; } td { white-space: nowrap; }
td.name { text-align: left; font-family: monospace; white-space: normal; }
tr.best { background: #fff4c2; font-weight: bold; } tr.base { background: #eef3ff; font-style: italic; }
td.better { background: #e3f6e3; } td.worse { background: #fbe3e3; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 8px 12px; }
.meta, .caption { color: #555; font-size: 0.9em; }
.protocol { font-size: 0.88em; } .protocol code { font-size: 0.95em; word-break: break-all; }
.plots { display: flex; flex-wrap: wrap; gap: 8px 20px; align-items: flex-start; }
figure { margin: 12px 0 24px; } img { max-width: 100%; border: 1px solid #eee; }
ol.columns { font-size: 0.85em; color: #444; margin-top: 4px; }
"""


def render_html(
    root: Path,
    runs: list[Run],
    keys: list[str],
    metrics: dict[str, tuple[str, bool]],
    plots: dict[str, Path],
    grids: dict[str, Optional[dict]],
    eval_name: Optional[str],
) -> str:
    e = html.escape
    evaluated = [r for r in runs if r.eval]
    eval_cmd = f"python -m ghibli_lab.evaluate run_dir={root}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Sweep report: {e(root.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Sweep report: {e(root.name)}</h1>",
        f'<p class="meta">{e(str(root))}<br>{len(runs)} run{"s" * (len(runs) != 1)}; swept: '
        f'{e(" × ".join(keys)) if keys else "nothing (a single run or identical configs)"}; '
        f"written {datetime.now():%Y-%m-%d %H:%M}</p>",
        "<h2>Evaluation</h2>",
    ]
    if not evaluated:
        parts.append(
            '<p class="note">Evaluation has not been run for this sweep'
            f'{f" (eval/{e(eval_name)}/)" if eval_name else ""}: no <code>eval/metrics.json</code> in any run. '
            f"The heatmaps below show the final training val/loss; run <code>{e(eval_cmd)}</code>, then this report again, "
            "for KID, FID, CLIP score and style similarity.</p>"
        )
        named = sorted({p.parent.name for r in runs for p in (r.path / "eval").glob("*/metrics.json")})
        if named:
            parts.append(f'<p class="note">Named evaluations exist: pass eval_name= one of {e(", ".join(named))}.</p>')
    else:
        if len(evaluated) < len(runs):
            missing = ", ".join(r.name for r in runs if not r.eval)
            parts.append(f'<p class="note">{len(evaluated)} of {len(runs)} runs evaluated; not evaluated: {e(missing)}.</p>')
        parts.append(eval_table(runs, keys))
        parts.append(protocol_html(evaluated))

    parts.append("<h2>Metrics over the swept values</h2>")
    if keys:
        parts.append(f'<p class="caption">Best value outlined. Axes: {e(" × ".join(keys))}.</p>')
    parts.append('<div class="plots">')
    for metric in metrics:
        if plot_name(metric) in plots:
            parts.append(figure(plots[plot_name(metric)], root / "report", metrics[metric][0]))
    parts.append("</div>")

    matrix_path = root / (f"style_matrix_{eval_name}.json" if eval_name else "style_matrix.json")
    if matrix_path.is_file():
        parts.append("<h2>Style separation</h2>")
        parts.append(style_matrix_html(json.loads(matrix_path.read_text())))

    parts.append("<h2>Validation loss</h2>")
    if "val_loss_curves" in plots:
        parts.append(figure(plots["val_loss_curves"], root / "report", "val/loss of every run against the step"))
    else:
        parts.append('<p class="note">No run logged a val/loss (train.val_every=0 or no held-out images).</p>')
    parts.append(training_table(runs, keys))

    parts.append("<h2>Base vs LoRA</h2>")
    parts.append('<p class="caption">Per run: the held-out images (after evaluation), the base model, the LoRA: same captions and seeds in each column.</p>')
    for r in runs:
        grid = grids[r.name]
        if grid is None:
            parts.append(f'<h3>{e(r.name)}</h3><p class="note">No images: no eval images and no samples/final.png.</p>')
            continue
        parts.append(f"<h3>{e(r.name)}</h3>")
        parts.append(figure(grid["path"], root / "report", grid["source"]))
        if grid["columns"]:
            items = "".join(f"<li>{e(c['prompt'])} (seed {c['seed']})</li>" for c in grid["columns"])
            parts.append(f'<ol class="columns">{items}</ol>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def figure(path: Path, base_dir: Path, caption: str) -> str:
    src = quote(path.relative_to(base_dir).as_posix())
    text = html.escape(caption)
    return f'<figure><img src="{src}" alt="{text}"><figcaption class="caption">{text}</figcaption></figure>'


def eval_table(runs: list[Run], keys: list[str]) -> str:
    """One row per run and one per distinct base model, by KID, each with its N and its LoRA − base
    intervals; a run is marked best only where its KID interval says it beats its base."""
    e = html.escape
    rows, bases = [], {}
    for r in runs:
        if r.eval:
            rows.append(("run", r.name, r, r.eval["lora"]))
            bases.setdefault(r.eval["protocol"].get("base_images"), (r, r.eval["base"]))
    for i, (r, values) in enumerate(bases.values()):
        rows.append(("base", "base model" if len(bases) == 1 else f"base model ({r.name})", r, values))
    rows.sort(key=lambda row: num(row[3].get(HEADLINE)))
    best = best_run({r.name: r.eval for r in runs if r.eval})
    header = ["run", *keys, "N", *(label for label, _ in EVAL_METRICS.values()), f"{EVAL_METRICS[HEADLINE][0]}: LoRA − base [95%]"]
    out = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for kind, label, run, values in rows:
        is_best = kind == "run" and label == best
        css = ' class="best"' if is_best else (' class="base"' if kind == "base" else "")
        mark = "★ best: " if is_best else ""
        cells = [f'<td class="name">{mark}{e(label)}</td>']
        cells += [f"<td>{e(show(axis_value(run, k))) if kind == 'run' else ''}</td>" for k in keys]
        p = run.eval["protocol"]
        cells.append(f"<td>{p.get('n_fake')} vs {p.get('n_real')}</td>")
        cells += [f"<td>{cell(values.get(k))}</td>" for k in EVAL_METRICS]
        d = run.eval.get("paired", {}).get(HEADLINE) if kind == "run" else None
        cells.append(f"<td>{interval_html(d) + verdict(d) if d else '-'}</td>")
        out.append(f"<tr{css}>" + "".join(cells) + "</tr>")
    out.append("</table>")
    if best:
        out.append(
            f'<p class="caption">Sorted by KID, lower is better. ★ {e(best)}: its LoRA − base interval on KID '
            "excludes 0 in the better direction, and its KID is the lowest of those. N: generated vs held-out images.</p>"
        )
    else:
        out.append(
            '<p class="note">No run is distinguishable from its base model on KID: every 95% interval of '
            "LoRA − base includes 0 or favours the base, so no run is marked best.</p>"
        )
    out.append(paired_table(runs, keys))
    return "\n".join(out)


def verdict(d: dict) -> str:
    return "<br>better" if d["better"] else "<br>worse" if d["worse"] else "<br>(includes 0)"


def interval_html(d: dict) -> str:
    """The difference, and its interval on a second line (the tables stay narrow)."""
    diff, low, high = (format(d[k], "+.3g") for k in ("diff", "low", "high"))
    return f"{diff}<br><small>[{low}, {high}]</small>"


def paired_table(runs: list[Run], keys: list[str]) -> str:
    """LoRA − base for every metric of every run, with its 95% paired bootstrap interval."""
    e = html.escape
    metrics = [k for k in EVAL_METRICS if any(k in (r.eval or {}).get("paired", {}) for r in runs)]
    if not metrics:
        return ""
    header = ["run", *keys, *(EVAL_METRICS[k][0] for k in metrics)]
    out = [
        "<h3>LoRA − base, with 95% intervals</h3>",
        '<p class="caption">A paired bootstrap over the held-out prompts: the LoRA and the base model drew the '
        "same prompts and seeds. Green: the interval excludes 0 in the better direction; red: in the worse one.</p>",
        "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>",
    ]
    for r in runs:
        if not r.eval:
            continue
        cells = [f'<td class="name">{e(r.name)}</td>'] + [f"<td>{e(show(axis_value(r, k)))}</td>" for k in keys]
        for k in metrics:
            d = r.eval.get("paired", {}).get(k)
            css = ' class="better"' if d and d["better"] else (' class="worse"' if d and d["worse"] else "")
            cells.append(f"<td{css}>{interval_html(d) if d else '-'}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def num(value: Any) -> float:
    return float(value) if value is not None else math.inf


def cell(value: Any) -> str:
    return "-" if value is None else html.escape(fmt(value))


def protocol_html(evaluated: list[Run]) -> str:
    """The protocol behind every number in the table, printed under it."""
    e = html.escape
    p = evaluated[0].eval["protocol"]
    same = not protocols_differ([r.eval["protocol"] for r in evaluated])
    items = [
        f"<li><b>Images:</b> N = {p.get('n_fake')} generated vs {p.get('n_real')} held-out real images; "
        f"{e(str(p.get('prompts', '')))}; {e(str(p.get('image_format', '')))}</li>",
        f"<li><b>Sampling:</b> {e(str(p.get('scheduler')))}, {p.get('steps')} steps, guidance "
        f"{p.get('guidance_scale')}, {p.get('resolution')} px, {p.get('images_per_prompt')} image(s) per held-out "
        f"caption; seed {p.get('seed')}: {e(str(p.get('seeds')))}</li>",
        f"<li><b>CLIP score text:</b> {e(str(p.get('clip_text')))}</li>",
        f"<li><b>LoRA − base:</b> {e(str(p.get('paired')))}</li>",
        f"<li><b>KID:</b> subset size {p.get('kid_subset_size')}"
        + (" (clamped to N: fewer images than the configured subset size)" if p.get("kid_subset_clamped") else "")
        + "</li>",
    ]
    if p.get("fid_warning"):
        items.append(f"<li><b>FID warning:</b> {e(str(p['fid_warning']))}</li>")
    features = [f"<li><b>Features:</b> {e(str(p.get('features')))}; resize: {e(str(p.get('resize')))}<ul>"]
    for role, info in (p.get("feature_models") or {}).items():
        if isinstance(info, dict):
            fields = "; ".join(
                f"{e(str(k))} <code>{e(str(v))}</code>" if k == "sha256" else f"{e(str(k))} {e(str(v))}"
                for k, v in info.items()
            )
            features.append(f"<li>{e(role)}: {fields}</li>")
    features.append("</ul></li>")
    items += features
    if p.get("val_loss"):
        items.append(f"<li><b>val loss:</b> {e(str(p['val_loss']))}</li>")
    for name, note in (p.get("metrics") or {}).items():
        items.append(f"<li><b>{e(EVAL_METRICS.get(name, (name,))[0])}:</b> {e(note)}</li>")
    statuses = sorted({r.eval["protocol"].get("base_images_status") for r in evaluated} - {None})
    if statuses:
        items.append(f"<li><b>Base images:</b> {e(', '.join(statuses))} (content-keyed cache: model weights, split, "
                     f"sampling, seeds, library versions, device)</li>")
    if p.get("device"):
        items.append(f"<li><b>Device:</b> {e(str(p['device']))}, {e(str(p.get('dtype')))}</li>")
    if p.get("versions"):
        items.append("<li><b>Versions:</b> " + ", ".join(f"{e(k)} {e(str(v))}" for k, v in p["versions"].items()) + "</li>")
    if not same:
        items.append("<li><b>Warning:</b> the runs were evaluated under different protocols; compare only like with like.</li>")
    return '<div class="protocol"><b>Protocol</b><ul>' + "".join(items) + "</ul></div>"


def style_matrix_html(matrix: dict) -> str:
    """Each adapter's generated images against every style's held-out images (evaluate's
    style_matrix.json): a row per run, its own style's cell outlined; lower KID is closer."""
    e = html.escape
    styles = matrix["styles"]
    out = ["<table><tr><th>run (trained on)</th>" + "".join(f"<th>{e(s)}</th>" for s in styles) + "<th>own style lowest</th></tr>"]
    for run, row in matrix["runs"].items():
        cells = []
        for style in styles:
            c = row["kid"][style]
            css = ' class="best"' if style == row["style"] else ""
            cells.append(f"<td{css}>{e(fmt(c['kid']))} [{e(fmt(c['low']))}, {e(fmt(c['high']))}]</td>")
        verdict = "yes, clearly" if row["clearly"] else "yes" if row["lowest_is_own"] else "no"
        out.append(f'<tr><td class="name">{e(run)} ({e(row["style"])})</td>' + "".join(cells) + f"<td>{verdict}</td></tr>")
    out.append("</table>")
    out.append(
        f'<p class="caption">{e(matrix["metric"])}. An adapter that learned its style is closest to its own '
        "style's held-out images (its outlined cell is the row's lowest); \"clearly\": that interval lies "
        "below every other style's.</p>"
    )
    return "\n".join(out)


def training_table(runs: list[Run], keys: list[str]) -> str:
    """Training results and what each run cost: the method, trainable parameters, the exported
    weights' size on disk, peak memory, wall time and speed."""
    e = html.escape
    header = ["run", *keys, "val/loss start", "val/loss end", "train/loss", "steps", *COST_COLUMNS.values()]
    out = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for r in runs:
        s, costs = r.summary, run_costs(r.summary)
        cells = [f'<td class="name">{e(r.name)}</td>'] + [f"<td>{e(show(axis_value(r, k)))}</td>" for k in keys]
        cells += [f"<td>{cell(s.get(k))}</td>" for k in ("val/loss_initial", "val/loss", "train/loss", "steps")]
        cells += [f"<td>{e(costs[k]) if isinstance(costs[k], str) else cell(costs[k])}</td>" for k in COST_COLUMNS]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    sources = sorted({r.summary.get("peak_memory_source") for r in runs if r.summary.get("peak_memory_source")})
    if sources:
        out.append(f'<p class="caption">Peak memory: {e(", ".join(sources))}. File size: the exported weights on disk.</p>')
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# W&B


def log_to_wandb(run: Run, images: dict[str, Path], eval_name: Optional[str]) -> bool:
    """The report's plots and this run's grid, with its config flattened to top-level keys
    (``lora.rank``, ...: W&B's parallel-coordinates and scatter panels list these directly) and its
    eval metrics, as a W&B run of its own (job_type "report") in the training run's group.
    Skipped (False) when the run had W&B disabled or recorded no id."""
    values = summary_values(run.eval, eval_name) if run.eval else {}
    return log_side_run(run.path, "report", values, run.config, images)


@hydra.main(config_path=CONF_DIR, config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        path = report(cfg)
    except (FileNotFoundError, ValueError) as err:  # a wrong sweep_dir or value: the message, no trace
        raise SystemExit(f"ghibli_lab.report: {err}") from None
    print(f"report: {path}")


if __name__ == "__main__":
    main()
