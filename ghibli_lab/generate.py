"""Images from trained runs:  python -m ghibli_lab.generate prompt="..." loras=[<run dir>, <file>]

Writes into ``output_dir``:

- ``grid.png``: one column per prompt, a base-model row on top and one row per LoRA, every image
  from the same seed; ``grid.json`` beside it names the rows and columns and the settings;
- with ``blend=[a, b]``: ``blend.png`` (+ ``.json``), one row per prompt and one column per weight
  w of ``blend_weights``, adapter a at weight 1 - w and b at w, so w = 0 is a alone and w = 1 is b.

A LoRA is a run dir, a run's ``lora/`` dir, a diffusers ``.safetensors`` or a kohya
``.safetensors`` file. Runs of the other methods work the same way in ``loras``: a full fine-tune
(a run dir, or a folder holding ``unet/``) and a textual-inversion embedding (a run dir or its
``.safetensors`` file), each row prompted with its run's trigger. ``blend`` mixes adapters, so it
takes LoRA and DoRA runs only. ``run=<run dir>`` takes the model (and, unless set, the resolution and
caption prefix) from that run's ``.hydra/config.yaml``.

The LoRA list is ``loras``, not ``lora``: ``conf/`` has a ``lora/`` config group, and Hydra reads
``lora=[...]`` as a choice from that group ("Could not override 'lora'. No match in the defaults
list"). For the same reason the sampler is the ``scheduler`` group, as in training:
``scheduler=ddpm scheduler.steps=30``.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ghibli_lab.adapters import DIFFUSERS_FILE, load_lora, without_adapter
from ghibli_lab.methods import applied, embedding_token, prompt_text, run_method, weights_dir, weights_kind
from ghibli_lab.config import CONF_DIR, register_configs
from ghibli_lab.hub import OfflineError
from ghibli_lab.pipeline import SAMPLERS, load_pipeline
from ghibli_lab.runs import is_run
from ghibli_lab.runs import load_run_config as read_run_config
from ghibli_lab.sampling import generate as sample
from ghibli_lab.sampling import image_grid

log = logging.getLogger(__name__)
register_configs()

DEFAULT_RESOLUTION = {"tiny": 64, "sdxl": 1024, "sd15": 512}


class InputError(ValueError):
    """Bad input (no prompt, a missing LoRA file, ...): reported as one message, no traceback."""




@dataclass
class LoraSource:
    spec: str  # as given
    file: Path  # the .safetensors file to load (a full fine-tune: the folder holding unet/)
    run_dir: Optional[Path]  # the training run it came from, if any
    name: str
    kind: str = "lora"  # lora (LoRA, DoRA) | full | embeddings: methods.weights_kind
    method: Optional[DictConfig] = None  # the run's method; its trigger goes in front of every prompt


def generate(cfg: DictConfig) -> dict[str, Path]:
    """Write ``grid.png`` (+ ``grid.json``) and, with ``blend``, ``blend.png`` (+ ``.json``) into
    ``cfg.output_dir``. Returns their paths by name. Bad input raises ``InputError`` before any
    model loads."""
    prompts = read_prompts(cfg.prompt, cfg.prompts_file)
    run_cfg = load_run_config(cfg.run) if cfg.run else None
    model_cfg = run_cfg.model if run_cfg is not None else cfg.model
    loras = [resolve_lora(spec) for spec in cfg.loras] or ([resolve_lora(cfg.run)] if cfg.run else [])
    blend = [resolve_lora(spec) for spec in cfg.blend]
    if blend and len(blend) != 2:
        raise InputError(f"blend takes exactly two LoRAs, got {len(blend)}: {list(cfg.blend)}")
    if blend and not cfg.blend_weights:
        raise InputError("blend_weights is empty: give e.g. blend_weights=[0,0.5,1]")
    for source in blend:
        if source.kind != "lora":
            raise InputError(f"blend mixes LoRA/DoRA adapters; {source.spec!r} is a {source.kind} run: put it in loras=[...]")
    for source in loras + blend:
        check_family(source, model_cfg)
    if cfg.scheduler.name not in SAMPLERS:
        raise InputError(f"scheduler.name={cfg.scheduler.name!r} is not one of {', '.join(SAMPLERS)}")
    if cfg.scheduler.steps < 1:
        raise InputError(f"scheduler.steps must be >= 1, got {cfg.scheduler.steps}")
    if cfg.resolution is not None:
        resolution = cfg.resolution
    elif run_cfg is not None:
        resolution = run_cfg.dataset.resolution
    else:
        resolution = DEFAULT_RESOLUTION["tiny" if model_cfg.pretrained == "tiny" else model_cfg.family]
    if resolution <= 0 or resolution % 8:
        raise InputError(f"resolution must be a positive multiple of 8, got {resolution}")
    prefix = cfg.caption_prefix
    if prefix is None:
        prefix = run_cfg.dataset.caption_prefix if run_cfg is not None else ""
    full_prompts = [prefix + p for p in prompts]
    settings = dict(
        scheduler=cfg.scheduler.name, steps=cfg.scheduler.steps, guidance_scale=float(cfg.guidance_scale), resolution=resolution
    )
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    pipe = load_pipeline(model_cfg).to("cuda" if torch.cuda.is_available() else "cpu")
    adapters: dict[Path, str] = {}  # one adapter per distinct file, shared by the grid and the blend
    for source in [s for s in loras + blend if s.kind == "lora"]:
        if source.file not in adapters:
            adapters[source.file] = f"lora_{len(adapters)}"
            load_adapter(pipe, source, adapters[source.file], model_cfg)

    # The grid: base row, then each LoRA alone at lora_scale.
    with without_adapter(pipe):
        rows = [sample(pipe, full_prompts, [cfg.seed], **settings)]
    for source in loras:
        prompts_here = [prompt_text(source.method, p) for p in full_prompts] if source.method is not None else full_prompts
        if source.kind == "lora":
            pipe.set_adapters([adapters[source.file]], [cfg.lora_scale])
            rows.append(sample(pipe, prompts_here, [cfg.seed], **settings))
        else:  # the other methods' weights, alone: every LoRA row's adapter off meanwhile
            with without_adapter(pipe), applied(pipe, source.file):
                rows.append(sample(pipe, prompts_here, [cfg.seed], **settings))
    labels = ["base", *(f"LoRA {i + 1}" for i in range(len(loras)))]
    paths = {"grid": out_dir / "grid.png"}
    grid = image_grid(rows, labels=labels)
    grid.save(paths["grid"])
    tile_w, tile_h = rows[0][0].size
    meta = {
        "rows": [{"label": "base", "lora": None}]
        + [
            {"label": f"LoRA {i + 1}", "name": s.name, "lora": str(s.file), "kind": s.kind,
             "trigger": s.method.trigger if s.method is not None else "", "scale": cfg.lora_scale if s.kind == "lora" else None}
            for i, s in enumerate(loras)
        ],
        "columns": [{"prompt": p, "seed": cfg.seed} for p in full_prompts],
        "model": OmegaConf.to_container(model_cfg),
        "tile": [tile_w, tile_h],
        "label_width": grid.width - tile_w * len(full_prompts),  # image_grid's label strip, left
        **settings,
    }
    paths["grid_json"] = write_json(out_dir / "grid.json", meta)

    # The blend: one row per prompt, one column per weight; weights [1 - w, w] on [a, b].
    if blend:
        a, b = (adapters[s.file] for s in blend)
        columns = []
        for w in cfg.blend_weights:
            pipe.set_adapters([a, b], [(1 - w) * cfg.lora_scale, w * cfg.lora_scale])
            columns.append(sample(pipe, full_prompts, [cfg.seed], **settings))
        strips = [[column[i] for column in columns] for i in range(len(full_prompts))]
        paths["blend"] = out_dir / "blend.png"
        strip = image_grid(strips, labels=[f"prompt {i + 1}" for i in range(len(strips))])
        strip.save(paths["blend"])
        blend_meta = {
            "a": {"name": blend[0].name, "lora": str(blend[0].file)},
            "b": {"name": blend[1].name, "lora": str(blend[1].file)},
            "rows": [{"label": f"prompt {i + 1}", "prompt": p, "seed": cfg.seed} for i, p in enumerate(full_prompts)],
            "columns": [{"weight_a": (1 - w) * cfg.lora_scale, "weight_b": w * cfg.lora_scale, "w": w} for w in cfg.blend_weights],
            "model": OmegaConf.to_container(model_cfg),
            "tile": [tile_w, tile_h],
            "label_width": strip.width - tile_w * len(cfg.blend_weights),
            **settings,
        }
        paths["blend_json"] = write_json(out_dir / "blend.json", blend_meta)
    for name, path in paths.items():
        log.info("%s: %s", name, path)
    return paths


def read_prompts(prompt: Optional[str], prompts_file: Optional[str]) -> list[str]:
    prompts = [prompt] if prompt else []
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise InputError(f"prompts_file={prompts_file}: no such file")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise InputError("no prompt: give prompt=\"a castle in the clouds\" or prompts_file=<file, one prompt per line>")
    return prompts


def load_run_config(run: str) -> DictConfig:
    try:
        return read_run_config(run)
    except FileNotFoundError as err:
        raise InputError(f"run={err}") from None


def resolve_lora(spec: str) -> LoraSource:
    """A run dir, its weights dir, or a file -> the file to load, and the run it belongs to."""
    path = Path(spec).expanduser()
    if is_run(path):
        run_cfg = read_run_config(path)
        method, path = run_method(run_cfg), weights_dir(path, run_cfg)
        if not path.exists():
            raise InputError(f"run {spec!r} has no trained weights ({path.name}/): did its training finish?")
        kind = weights_kind(path)
        if kind == "embeddings":
            path = sorted(path.glob("*.safetensors"))[0]
        if kind != "lora":
            return LoraSource(spec, path.resolve(), Path(spec), Path(spec).name, kind, method)
    elif path.exists() and weights_kind(path) != "lora":
        kind = weights_kind(path)
        token = embedding_token(path) if kind == "embeddings" else ""
        method = OmegaConf.create({"trigger": f"{token} " if token else "", "weights": kind, "num_vectors": 1, "token": token})
        return LoraSource(spec, path.resolve(), None, path.stem if path.is_file() else path.name, kind, method)
    if path.is_dir():
        path = path / DIFFUSERS_FILE
    if not path.is_file():
        raise InputError(
            f"LoRA {spec!r}: no LoRA file at {path} (give a run dir, its lora/ dir, "
            "a diffusers .safetensors or a kohya .safetensors file)"
        )
    run = path.parent.parent
    run_dir = run if path.parent.name == "lora" and is_run(run) else None
    method = run_method(read_run_config(run_dir)) if run_dir is not None else None
    if run_dir is not None:
        name = run_dir.name if path.name == DIFFUSERS_FILE else f"{run_dir.name}/{path.name}"
    else:
        name = path.stem
    return LoraSource(spec, path.resolve(), run_dir, name, "lora", method)


def check_family(source: LoraSource, model_cfg: DictConfig) -> None:
    """A LoRA from one of our runs must meet a model of the family it was trained on."""
    if source.run_dir is None:
        return
    trained = read_run_config(source.run_dir).model
    if trained.family != model_cfg.family:
        raise InputError(
            f"LoRA {source.spec!r} was trained on {trained.family} ({trained.pretrained}) but the model is "
            f"{model_cfg.family} ({model_cfg.pretrained}): pass run={source.run_dir} or model=..."
        )
    if trained.pretrained != model_cfg.pretrained:
        log.warning("LoRA %s was trained on %s, applying it to %s", source.name, trained.pretrained, model_cfg.pretrained)


def load_adapter(pipe, source: LoraSource, adapter: str, model_cfg: DictConfig) -> None:
    try:
        with warnings.catch_warnings():  # a second adapter in one model is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            load_lora(pipe, source.file, adapter_name=adapter)
    except (ValueError, KeyError, RuntimeError) as err:  # keys or shapes that don't fit this model
        raise InputError(
            f"LoRA {source.spec!r} does not fit the {model_cfg.family} model {model_cfg.pretrained!r}: {err}"
        ) from err


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path


def grid_tile(path: Path, row: int, column: int) -> Image.Image:
    """One image back out of a ``grid.png`` / ``blend.png`` written here (via its JSON)."""
    meta = json.loads(path.with_suffix(".json").read_text())
    w, h = meta["tile"]
    x = meta["label_width"] + column * w
    return Image.open(path).convert("RGB").crop((x, row * h, x + w, (row + 1) * h))


@hydra.main(config_path=CONF_DIR, config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        paths = generate(cfg)
    except (InputError, OfflineError) as err:  # expected failures: the message, not a stack trace
        raise SystemExit(f"ghibli_lab.generate: {err}") from None
    for name in ("grid", "blend"):
        if name in paths:
            print(f"{name}: {paths[name]}")


if __name__ == "__main__":
    main()
