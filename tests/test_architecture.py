"""The shape of the package: imports run one way, train() fits one screen, the config's values
live in YAML only, and a bad config fails before the heavy libraries load."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import MISSING

from ghibli_lab import config

from .conftest import ROOT

PACKAGE = ROOT / "ghibli_lab"
ENTRY_POINTS = {"train", "evaluate", "report", "generate", "bench", "publish"}


def package_imports(top_level_only: bool) -> dict[str, set[str]]:
    """module -> the ghibli_lab modules it imports (anywhere in the file, or at its top level)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        found = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "ghibli_lab":
                    found |= {alias.name for alias in node.names}
                elif node.module.startswith("ghibli_lab."):
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ghibli_lab.")}
        graph[path.stem] = found - {path.stem}
    return graph


def test_no_module_imports_an_entry_point():
    graph = package_imports(top_level_only=False)
    offenders = {m: sorted(deps & ENTRY_POINTS) for m, deps in graph.items() if deps & ENTRY_POINTS}
    # train.py re-imports itself under __main__ only (for submitit's pickling); nothing else may.
    assert offenders == {"train": ["train"]} or offenders == {}, offenders


def test_the_import_graph_has_no_cycle():
    graph = package_imports(top_level_only=False)
    graph["train"].discard("train")
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [module, dep])
            if dep not in state:
                visit(dep, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_train_fits_one_screen():
    from ghibli_lab.train import train

    lines = inspect.getsource(train).splitlines()
    assert len(lines) <= 60, f"train() is {len(lines)} lines"


def test_schemas_hold_no_default_values():
    """Values live in conf/*.yaml only: a schema default could disagree with the YAML."""
    defaults = []
    for cls in vars(config).values():
        if dataclasses.is_dataclass(cls) and cls.__module__ == config.__name__:
            for f in dataclasses.fields(cls):
                nested = f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)
                if f.default is not MISSING and not nested:
                    defaults.append(f"{cls.__name__}.{f.name}")
    assert defaults == []


def test_a_bad_config_fails_fast_without_loading_the_heavy_libraries(tmp_path):
    probe = "import sys, ghibli_lab.train; print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'wandb') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "ghibli_lab.train", "experiment=demo", "lora.rank=0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "GHIBLI_LAB_CACHE": str(tmp_path)},
    )
    elapsed = time.time() - start
    assert proc.returncode != 0
    assert "lora.rank must be > 0, got 0" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs" / "latest").exists()  # latest did not move to a run that never ran
    assert elapsed < 20, elapsed  # ~1 s on a 2-core CPU; the bound only catches a heavy import creeping back
