"""The sweep report: tables, heatmaps, curves and grids from a real tiny sweep, rendered by Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from ghibli_lab.evaluate import evaluate
from ghibli_lab.report import Run, name_overrides, plot_metric, report, swept_keys
from ghibli_lab.train import train

from .conftest import compose_train, wandb_offline_runs

CHROMIUM = Path("/usr/bin/chromium")
GRID = [(4, 4), (8, 4), (4, 8), (8, 8)]  # (alpha, rank) in job order, as `train -m` numbers them
WANDB_JOBS = {3}  # this one trains with W&B offline, the others with logger=none
TILE = 64



@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 2x2 lora.rank x lora.alpha sweep dir of tiny trained runs, laid out as `train -m` leaves it."""
    root = tmp_path_factory.mktemp("sweeps") / "12-00-00_demo"
    for i, (alpha, rank) in enumerate(GRID):
        logger = ["logger=wandb", "logger.mode=offline"] if i in WANDB_JOBS else ["logger=none"]
        cfg = compose_train(
            [
                "experiment=demo",
                *logger,
                f"lora.alpha={alpha}",
                f"lora.rank={rank}",
                "train.max_steps=4",
                "train.batch_size=2",
                "train.val_every=2",
                "train.checkpoint_every=0",
                "train.log_every=2",
                "dataset.num_images=20",
                "scheduler.steps=2",
                "sample.seeds=[0]",
                f"cache_dir={root.parent / 'cache'}",
            ]
        )
        run = root / f"{i}_lora.alpha-{alpha}_lora.rank-{rank}"
        train(cfg, run)
        (run / ".hydra").mkdir()
        OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return root


@pytest.fixture(scope="module")
def evaluated(sweep):
    """The sweep after `ghibli_lab.evaluate` (tiny features, 2 steps, 2 seeds per held-out image)."""
    evaluate(compose_train([f"run_dir={sweep}", "eval.features=tiny", "eval.steps=2"], config_name="evaluate"))
    return sweep


def compose_report(*overrides: str):
    return compose_train(list(overrides), config_name="report")


def assert_nontrivial_png(path: Path, min_size=(150, 100)) -> np.ndarray:
    image = Image.open(path)
    assert image.format == "PNG"
    assert image.width >= min_size[0] and image.height >= min_size[1]
    pixels = np.asarray(image.convert("RGB")).astype(float)
    assert pixels.std() > 10  # not a blank canvas
    return pixels


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def img_sources(index: Path) -> list[str]:
    parser = Images()
    parser.feed(index.read_text())
    return parser.src


def test_sweep_values_are_read_back_from_the_run_dir_names():
    keys = {"lora.alpha", "lora.rank", "train.max_steps", "sample.seeds", "lora", "train", "sample"}
    assert name_overrides("3_lora.alpha-8_lora.rank-8", keys) == {"lora.alpha": "8", "lora.rank": "8"}
    assert name_overrides("3_lora.alpha=8,lora.rank=8", keys) == {"lora.alpha": "8", "lora.rank": "8"}  # older naming
    assert name_overrides("0_lora.rank-16_train.max_steps-100", keys) == {"lora.rank": "16", "train.max_steps": "100"}
    assert name_overrides("1_lora-r4a8_sample.seeds--0-1-", keys) == {"lora": "r4a8", "sample.seeds": "-0-1-"}
    assert name_overrides("12-00-00_demo", keys) == {}


def test_a_swept_config_group_is_one_axis(tmp_path):
    """lora=r4a8,r16a32 changes lora.rank and lora.alpha together: one axis named lora."""
    runs = [
        Run(tmp_path / f"{i}_lora-{name}", {"lora.rank": r, "lora.alpha": a, "seed": 0}, {}, {}, [], None, tmp_path)
        for i, (name, r, a) in enumerate([("r4a8", 4, 8.0), ("r16a32", 16, 32.0)])
    ]
    assert swept_keys(runs) == ["lora"]
    assert [r.overrides for r in runs] == [{"lora": "r4a8"}, {"lora": "r16a32"}]


def test_one_swept_key_gives_an_annotated_bar_chart(tmp_path):
    runs = [
        Run(tmp_path / f"{i}_guidance.scale-{g}", {"guidance.scale": g, "seed": 0}, {}, {}, [], None, tmp_path)
        for i, g in enumerate([1.0, 4.0, 7.5])
    ]
    keys = swept_keys(runs)
    assert keys == ["guidance.scale"]
    values = {r.name: v for r, v in zip(runs, [0.3, 0.1, 0.2])}
    path = plot_metric(runs, keys, values, "KID", True, 0.25, tmp_path / "bars.png")
    assert_nontrivial_png(path)


def test_report_before_evaluation_says_so_and_still_has_curves_and_grids(sweep, tmp_path):
    copy = tmp_path / sweep.name
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("eval", "wandb", "report", "eval_table*"))
    index = report(compose_report(f"sweep_dir={copy}", "wandb=false", f"tile={TILE}"))
    text = index.read_text()
    assert "Evaluation has not been run" in text and f"run_dir={copy}" in text
    assert_nontrivial_png(index.parent / "heatmap_train_val_loss.png")
    assert_nontrivial_png(index.parent / "val_loss_curves.png")
    grids = sorted((index.parent / "grids").glob("*.png"))
    assert len(grids) == 4
    for grid in grids:  # samples/final.png re-tiled: base over LoRA, 2 prompts x 1 seed
        assert Image.open(grid).size == (60 + 2 * TILE, 2 * TILE)
    assert "samples/final.png" in text


def test_report_of_an_evaluated_sweep(evaluated, tmp_path):
    sweep = evaluated
    index = report(compose_report(f"sweep_dir={sweep}", f"tile={TILE}", "max_columns=8"))
    assert index == sweep / "report" / "index.html"
    text = index.read_text()
    results = {run.name: json.loads((run / "eval" / "metrics.json").read_text()) for run in sweep.glob("[0-9]_*")}
    assert len(results) == 4

    # The table: a run is marked best only if its KID interval (LoRA - base) excludes 0 in the
    # better direction, and then the lowest KID of those; a base model row; the protocol under it.
    beating = [name for name, r in results.items() if r["paired"]["kid"]["better"]]
    if beating:
        best = min(beating, key=lambda name: results[name]["lora"]["kid"])
        assert re.search(r'<tr class="best"><td class="name">★ best: ' + re.escape(best) + "</td>", text)
        assert text.count('class="best"') == 1
    else:
        assert 'class="best"' not in text and "No run is distinguishable from its base model" in text
    assert '<tr class="base"><td class="name">base model</td>' in text
    # eval table runs + base, the LoRA - base table's runs, the training table's runs
    assert text.count('<td class="name">') == 4 + 1 + 4 + 4
    for name, r in results.items():  # every run's KID difference with its interval
        d = r["paired"]["kid"]
        assert f"{d['diff']:+.3g}<br><small>[{d['low']:+.3g}, {d['high']:+.3g}]</small>" in text
    protocol = next(iter(results.values()))["protocol"]
    assert f"N = {protocol['n_fake']} generated vs {protocol['n_real']} held-out" in text
    assert "clamped to N" in text and html.escape(protocol["fid_warning"]) in text
    for model in protocol["feature_models"].values():
        if isinstance(model, dict) and "sha256" in model:
            assert model["sha256"] in text
    assert "ddim, 2 steps, guidance 7.5, 64 px, 1 image(s) per held-out caption" in text

    # One heatmap per metric over lora.alpha x lora.rank, the curves, and one grid per run.
    assert "swept: lora.alpha × lora.rank;" in text  # not logger.*: it differs too, but was not swept
    for metric in ("kid", "fid", "cmmd", "clip_score", "val_loss"):  # diversity: 1 image per caption, none
        assert_nontrivial_png(sweep / "report" / f"heatmap_{metric}.png")
    assert not (sweep / "report" / "heatmap_train_val_loss.png").exists()
    assert_nontrivial_png(sweep / "report" / "val_loss_curves.png")
    n = protocol["n_fake"]
    grids = sorted((sweep / "report" / "grids").glob("*.png"))
    assert len(grids) == 4
    for grid in grids:  # from the eval images: held-out row, base row (cached), LoRA row; n columns
        assert Image.open(grid).size == (60 + n * TILE, 3 * TILE)
    assert text.count('<figcaption class="caption">evaluation images (held out, base, LoRA): ddim, 2 steps') == 4

    # Every image the page shows is a file beside it: no network, no missing files.
    sources = img_sources(index)
    assert len(sources) == 5 + 1 + 4
    for src in sources:
        assert not urlparse(src).scheme and (index.parent / unquote(src)).is_file(), src

    # W&B: a run that trained with W&B has its evaluation and its report as W&B runs of their own
    # (job types eval and report, the training run's group); the training run is never reopened,
    # so no two offline runs share an id and `wandb sync` can't replace the training history.
    for i, run in enumerate(sorted(sweep.glob("[0-9]_*"))):
        if i not in WANDB_JOBS:
            assert not (run / "wandb").exists()
            continue
        ident = json.loads((run / "summary.json").read_text())["wandb"]
        offline = wandb_offline_runs(run / "wandb")
        ids = [r["id"] for r in offline]
        assert len(ids) == len(set(ids)) == 3, offline
        by_type = {r["job_type"]: r for r in offline}
        assert by_type["train"]["id"] == ident["id"] and by_type["train"]["group"] == ident["group"] == run.name
        assert by_type["train"]["steps"] == sorted(by_type["train"]["steps"])  # one history, in order
        for job in ("eval", "report"):
            assert by_type[job]["group"] == ident["group"] and "train_run_id" in by_type[job]["config"]
        report_run = by_type["report"]
        assert "lora.rank" in report_run["config"]  # a top-level dotted key, for parallel coordinates
        assert "eval/kid" in report_run["summary"] and "eval/kid" in by_type["eval"]["summary"]
        assert list(report_run["dir"].glob("files/media/images/report/grid_*.png"))
        assert list(report_run["dir"].glob("files/media/images/report/heatmap_kid_*.png"))

    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: the rendering check needs it")
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}", "--enable-logging=stderr", "--v=1",
            f"--screenshot={shot}", "--window-size=1200,2000", index.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    pixels = assert_nontrivial_png(shot, min_size=(1200, 2000))
    assert (pixels.min(axis=2) < 200).mean() > 0.05  # a page with content, not a white one
    # Chromium's own record of what it fetched: every file it asked for exists, nothing failed.
    fetched = {unquote(m) for m in re.findall(r"FileURLLoader::Start: file://(\S+)", proc.stderr)}
    assert str(index) in fetched
    assert all(Path(p).exists() for p in fetched), sorted(p for p in fetched if not Path(p).exists())
    assert {str(index.parent / unquote(src)) for src in sources} <= fetched
    assert "ERR_FILE_NOT_FOUND" not in proc.stderr and "Failed to load resource" not in proc.stderr
