"""A run's model card: ``<run_dir>/README.md``, the Hugging Face Hub's model card format.

YAML front matter (base model, license, tags, trigger) that the hub reads, then what the run
trained, on what, how far, how it scored against its base model (when evaluated), its files and
how to load them. Written only from the run's own files (``.hydra/config.yaml``, ``summary.json``,
``eval/metrics.json``), with no timestamps or machine paths, so the same run always gives the
same bytes and a re-publish without changes uploads an identical card.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig

from ghibli_lab.hub import BUILT_IN_CODE
from ghibli_lab.methods import run_method, weights_dir
from ghibli_lab.metrics import METRICS
from ghibli_lab.runs import load_run_config

CARD_FILE = "README.md"
SAMPLES_FILE = Path("samples") / "final.png"
METRICS_FILE = Path("eval") / "metrics.json"
# The held-out metrics the card shows, in this order (diversity needs eval.images_per_prompt >= 2
# and kid_subset_std is no uncertainty: both stay in metrics.json).
CARD_METRICS = ("kid", "fid", "cmmd", "clip_score", "val_loss")
LICENSES = {"sdxl": "openrail++", "sd15": "creativeml-openrail-m"}  # the base models' own licenses
FAMILY_TAGS = {"sdxl": "stable-diffusion-xl", "sd15": "stable-diffusion"}
FAMILY_LABELS = {"sdxl": "SDXL", "sd15": "SD 1.5"}
# An unpublished card's snippets load from the folder the card is in (python started there).
LOCAL_SOURCE = "."
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def write_model_card(run_dir: Path, repo_id: Optional[str] = None) -> Path:
    """Write ``run_dir/README.md`` for a finished run and return its path. With ``repo_id`` the
    loading snippets name that hub repo; without, the folder the card is in."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no summary.json: the run has not finished training")
    summary = json.loads(summary_path.read_text())
    metrics_path = run_dir / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    text = model_card(run_dir, cfg, summary, metrics, repo_id)
    path = run_dir / CARD_FILE
    write_text_atomic(path, text)
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename: a reader (or an upload) never
    sees half a file, whenever the writer stops."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def model_card(run_dir: Path, cfg: DictConfig, summary: dict, metrics: Optional[dict], repo_id: Optional[str]) -> str:
    """The card's text (front matter + markdown body)."""
    method = run_method(cfg)
    name = summary.get("method") or method.name
    files = weights_files(run_dir, cfg, summary)
    sections = [
        front_matter(cfg, name, method.weights),
        overview(run_dir, cfg, summary, name, method.weights),
        evaluation(metrics),
        samples(run_dir),
        files_section(files),
        how_to_load(cfg, method, files, repo_id or LOCAL_SOURCE, published=repo_id is not None),
    ]
    return "\n".join(s for s in sections if s)


def trigger(cfg: DictConfig) -> str:
    """What every prompt of these weights starts with: the method's trigger, then the dataset's
    caption prefix (the order training and evaluation build prompts in: methods.prompt_text)."""
    return run_method(cfg).trigger + cfg.dataset.caption_prefix


def is_hub_id(name: str) -> bool:
    """``owner/name``: a hub model id, not a local path or a model built in code."""
    return name not in BUILT_IN_CODE and not name.startswith(("/", ".", "~")) and bool(HUB_ID.match(name))


def front_matter(cfg: DictConfig, name: str, weights: str) -> str:
    family = cfg.model.family
    meta: dict[str, Any] = {}
    # base_model links the card to its base on the hub; a local path or "tiny" is no model id
    # there, so it is named in the body only.
    if is_hub_id(cfg.model.pretrained):
        meta["base_model"] = cfg.model.pretrained
    meta["library_name"] = "diffusers"
    meta["license"] = LICENSES[family]
    tags = ["text-to-image", FAMILY_TAGS[family]]
    tags += ["lora"] if weights in ("lora", "dora") else []
    tags += [name] if name not in tags else []
    meta["tags"] = tags + ["diffusers", "ghibli_lab"]
    if trigger(cfg):
        meta["instance_prompt"] = trigger(cfg)
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def overview(run_dir: Path, cfg: DictConfig, summary: dict, name: str, weights: str) -> str:
    family = FAMILY_LABELS[cfg.model.family]
    base = cfg.model.pretrained
    lines = [f"# {run_dir.name}: {name} on {family}", ""]
    lines.append(f"A `{name}` fine-tune of {family} trained with `ghibli_lab` on the `{cfg.dataset.name}` images.")
    lines += ["", "| | |", "|---|---|"]
    lines.append(f"| method | `{name}` (weights: {weights}) |")
    base_notes = {
        "tiny": " (a test model built in code: random UNet and text encoders, a VAE that averages 8x8 blocks)",
        "random": " (built in code with random weights: a test model, its images are noise)",
    }
    base_note = base_notes.get(base, "")
    lines.append(f"| base model | `{base}`{base_note} |")
    if cfg.model.vae:
        lines.append(f"| VAE | `{cfg.model.vae}` |")
    lines.append(f"| trigger (prompt prefix) | {code(trigger(cfg)) if trigger(cfg) else 'none'} |")
    if weights in ("lora", "dora"):
        rank, alpha = summary.get("lora/rank", cfg.lora.rank), summary.get("lora/alpha", cfg.lora.alpha)
        lines.append(f"| LoRA rank / alpha | {rank} / {fmt(alpha)} (scale alpha/rank = {fmt(alpha / rank)}) |")
        text_encoder = "UNet and text encoder(s)" if cfg.lora.text_encoder else "UNet"
        lines.append(f"| LoRA on | {text_encoder} |")
    lines.append(
        f"| dataset | `{cfg.dataset.name}`: {summary.get('n_train', '-')} images trained on, "
        f"{summary.get('n_holdout', '-')} held out, at {cfg.dataset.resolution} px |"
    )
    lines.append(f"| training steps | {summary.get('steps', '-')} (batch {cfg.train.batch_size} x {cfg.train.grad_accum} accumulation) |")
    val, first = summary.get("val/loss"), summary.get("val/loss_initial")
    if val is not None:
        start = f" (base model: {fmt(first)})" if first is not None else ""
        lines.append(f"| held-out val/loss | {fmt(val)}{start} |")
    lines.append(f"| seed | {cfg.seed} |")
    return "\n".join(lines) + "\n"


def evaluation(metrics: Optional[dict]) -> str:
    if metrics is None:
        return (
            "## Evaluation\n\nNot evaluated yet: `python -m ghibli_lab.evaluate run_dir=<this run>` scores it "
            "against its base model on the held-out images.\n"
        )
    lora, base, paired, protocol = (metrics.get(k) or {} for k in ("lora", "base", "paired", "protocol"))
    lines = ["## Evaluation on held-out images", ""]
    lines.append(
        f"{protocol.get('n_fake', '-')} generated vs {protocol.get('n_real', '-')} held-out images "
        f"({protocol.get('images_per_prompt', '-')} per held-out caption), features `{protocol.get('features', '-')}`, "
        f"{protocol.get('scheduler', '-')} sampler, {protocol.get('steps', '-')} steps, guidance "
        f"{fmt(protocol.get('guidance_scale'))}, {protocol.get('resolution', '-')} px. "
        "The base model is scored on the same captions and seeds."
    )
    lines += ["", "| metric | this model | base model | this − base [95% interval] | |", "|---|---|---|---|---|"]
    for key in CARD_METRICS:
        if lora.get(key) is None:
            continue
        metric = METRICS[key]
        arrow = "↓" if metric.lower_is_better else "↑"
        d = paired.get(key) or {}
        if d.get("diff") is not None:
            diff = f"{fmt(d['diff'], signed=True)} [{fmt(d.get('low'))}, {fmt(d.get('high'))}]"
            verdict = "better" if d.get("better") else "worse" if d.get("worse") else "not distinguishable"
        else:
            diff, verdict = "-", ""
        lines.append(f"| {metric.label} {arrow} | {fmt(lora[key])} | {fmt(base.get(key))} | {diff} | {verdict} |")
    notes = [protocol.get("paired"), protocol.get("fid_warning")]
    if protocol.get("kid_subset_clamped"):
        notes.append(f"KID subset size clamped to N ({protocol.get('kid_subset_size')})")
    notes = [n for n in notes if n]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def samples(run_dir: Path) -> str:
    if not (run_dir / SAMPLES_FILE).is_file():
        return ""
    return (
        "## Samples\n\nTop row: the base model; bottom row: this model, at the same prompts and seeds.\n\n"
        f"![samples: base model on top, this model below]({SAMPLES_FILE.as_posix()})\n"
    )


def weights_files(run_dir: Path, cfg: DictConfig, summary: dict) -> dict[str, str]:
    """name -> path relative to the run dir: the summary's list, or (older runs) the weights dir's files."""
    files = summary.get("weights_files")
    if files:
        return dict(files)
    folder = weights_dir(run_dir, cfg)
    found = sorted(p for p in folder.rglob("*.safetensors") if p.is_file()) if folder.is_dir() else []
    return {p.relative_to(folder).as_posix(): p.relative_to(run_dir).as_posix() for p in found}


def files_section(files: dict[str, str]) -> str:
    if not files:
        return ""
    lines = ["## Files", "", "| file | what |", "|---|---|"]
    what = {
        "diffusers": "diffusers / PEFT format: `load_lora_weights`",
        "kohya": "kohya format: ComfyUI, AUTOMATIC1111, kohya's scripts",
        "unet": "the fine-tuned UNet (diffusers folder)",
        "text_encoder": "the fine-tuned text encoder (transformers folder)",
        "text_encoder_2": "the fine-tuned second text encoder (transformers folder)",
        "embeddings": "textual-inversion embedding, A1111/ComfyUI format",
    }
    for name, path in files.items():
        lines.append(f"| `{path}` | {what.get(name, name)} |")
    lines.append("| `training_config.yaml` | the full training config (when published) |")
    return "\n".join(lines) + "\n"


def how_to_load(cfg: DictConfig, method: DictConfig, files: dict[str, str], source: str, published: bool) -> str:
    """A diffusers snippet for the method's weights (plus where kohya/A1111 files go)."""
    base, weights = cfg.model.pretrained, method.weights
    prompt = trigger(cfg) + (cfg.sample.prompts[0] if cfg.sample.prompts else "a castle in the clouds")
    where = f"# {source!r}: this model's hub repo" if published else "# '.': this folder (or its hub repo id, once published)"
    head = ["import torch", "from diffusers import DiffusionPipeline"]
    pipe_args = ["torch_dtype=torch.float16"]
    if cfg.model.vae:
        head[-1] = "from diffusers import AutoencoderKL, DiffusionPipeline"
    body = [where, f"weights = {source!r}"]
    if cfg.model.vae:
        body.append(f"vae = AutoencoderKL.from_pretrained({cfg.model.vae!r}, torch_dtype=torch.float16)")
        pipe_args.insert(0, "vae=vae")
    extra = []
    if weights in ("lora", "dora"):
        path = Path(files.get("diffusers", "lora/pytorch_lora_weights.safetensors"))
        body.append(f"pipe = DiffusionPipeline.from_pretrained({base!r}, {', '.join(pipe_args)}).to('cuda')")
        body.append(f"pipe.load_lora_weights(weights, subfolder={path.parent.as_posix()!r}, weight_name={path.name!r})")
        if "kohya" in files:
            extra.append(
                f"ComfyUI / AUTOMATIC1111: copy `{files['kohya']}` (kohya keys, alpha included) into "
                "`models/loras/` and prompt with the trigger."
            )
    elif weights == "full":
        classes = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
        trained = [n for n in classes if n in files]
        if trained:
            head.append(f"from transformers import {', '.join(classes[n] for n in trained)}")
        head[1] = head[1].replace("DiffusionPipeline", "DiffusionPipeline, UNet2DConditionModel")
        # files["unet"] is <weights dir>/unet/diffusion_pytorch_model.safetensors
        folder = Path(files["unet"]).parent.parent.as_posix() if "unet" in files else "full"
        body.append(f"unet = UNet2DConditionModel.from_pretrained(weights, subfolder={folder + '/unet'!r}, torch_dtype=torch.float16)")
        for n in trained:
            body.append(f"{n} = {classes[n]}.from_pretrained(weights, subfolder={folder + '/' + n!r}, torch_dtype=torch.float16)")
        components = ["unet=unet", *(f"{n}={n}" for n in trained)]
        body.append(f"pipe = DiffusionPipeline.from_pretrained({base!r}, {', '.join(components + pipe_args)}).to('cuda')")
    else:  # embeddings
        path = files.get("embeddings", "embeddings/embedding.safetensors")
        token = method.token
        body.append(f"pipe = DiffusionPipeline.from_pretrained({base!r}, {', '.join(pipe_args)}).to('cuda')")
        if cfg.model.family == "sdxl":  # one file, a vector set per text encoder (clip_l, clip_g)
            head.append("from safetensors.torch import load_file")
            if published:
                head.append("from huggingface_hub import hf_hub_download")
                body.append(f"state = load_file(hf_hub_download(weights, {path!r}))")
            else:
                body.append(f"state = load_file(f'{{weights}}/{path}')")
            body.append(f"pipe.load_textual_inversion(state['clip_l'], token={token!r}, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)")
            body.append(f"pipe.load_textual_inversion(state['clip_g'], token={token!r}, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)")
        else:
            p = Path(path)
            body.append(f"pipe.load_textual_inversion(weights, subfolder={p.parent.as_posix()!r}, weight_name={p.name!r}, token={token!r})")
        extra.append(f"AUTOMATIC1111 / ComfyUI: copy `{path}` into `embeddings/`; A1111 triggers it by the file name.")
    body.append(f"image = pipe({prompt!r}).images[0]")
    lines = ["## How to load", "", "```python", *head, "", *body, "```"]
    if base in BUILT_IN_CODE:
        lines += ["", f"(`{base}` is built in code by ghibli_lab, not a hub model: this snippet shows the shape of a real run's.)"]
    if extra:
        lines += [""] + extra
    return "\n".join(lines) + "\n"


def code(text: str) -> str:
    """Inline code that keeps leading/trailing spaces visible (a trigger usually ends in one)."""
    return f"`{text}`" if text == text.strip() else f"`{text!r}`"


def fmt(value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.4g}" if signed else f"{value:.4g}"
    return str(value)
