"""Generate images at fixed prompts and seeds, with and without the LoRA, and lay them out."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw

from ghibli_lab.adapters import without_adapter
from ghibli_lab.pipeline import sampling_scheduler


def generate(
    pipe: DiffusionPipeline,
    prompts: list[str],
    seeds: list[int] | list[list[int]],
    scheduler: str,
    steps: int,
    guidance_scale: float,
    resolution: int,
) -> list[Image.Image]:
    """One image per (prompt, seed), prompt-major. ``seeds``: the same seeds for every prompt, or
    one list per prompt. Seeds drive a CPU generator, so the same seed gives the same starting
    noise on any device."""
    per_prompt = seeds if seeds and isinstance(seeds[0], (list, tuple)) else [seeds] * len(prompts)
    pipe.scheduler = sampling_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for prompt, prompt_seeds in zip(prompts, per_prompt):
        for seed in prompt_seeds:
            out = pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=torch.Generator("cpu").manual_seed(seed),
            )
            images.append(out.images[0])
    return images


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None) -> Image.Image:
    """Paste equally sized images into a grid, one list per row, with an optional row label."""
    w, h = rows[0][0].size
    label_w = 60 if labels else 0
    grid = Image.new("RGB", (label_w + w * max(len(r) for r in rows), h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        if labels:
            draw.text((4, i * h + h // 2 - 5), labels[i], fill="black")
        for j, image in enumerate(row):
            grid.paste(image, (label_w + j * w, i * h))
    return grid


def save_samples(
    pipe: DiffusionPipeline,
    out_path: Path,
    prompts: list[str],
    seeds: list[int],
    scheduler: str,
    steps: int,
    guidance_scale: float,
    resolution: int,
    trained_prompts: list[str] | None = None,
) -> Path:
    """Write a 2-row grid (base model on top, the trained weights below) over every (prompt, seed)
    column, and a JSON file beside it naming the columns and the sampling settings. The trained
    row uses ``trained_prompts`` (the prompts with the method's trigger) when given."""
    settings = dict(scheduler=scheduler, steps=steps, guidance_scale=guidance_scale, resolution=resolution)
    with without_adapter(pipe):
        base = generate(pipe, prompts, seeds, **settings)
    lora = generate(pipe, trained_prompts or prompts, seeds, **settings)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image_grid([base, lora], labels=["base", "trained"]).save(out_path)
    columns = [{"prompt": p, "trained_prompt": q, "seed": s} for p, q in zip(prompts, trained_prompts or prompts) for s in seeds]
    out_path.with_suffix(".json").write_text(json.dumps({"rows": ["base", "lora"], "columns": columns, **settings}, indent=2))
    return out_path
