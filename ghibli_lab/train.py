"""LoRA fine-tuning of SDXL / SD 1.5:  python -m ghibli_lab.train [overrides]   (-m for sweeps)

``train(cfg, run_dir)`` reads top to bottom: config → pipeline → LoRA → data → loop → save →
samples. Everything a run produces lands in its run dir (see README, "Outputs").
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ghibli_lab.cache import CachedDataset, cache_plan, encode_records, fingerprint
from ghibli_lab.checkpoint import MARKER, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from ghibli_lab.config import CONF_DIR, check_config, register_configs
from ghibli_lab.data import (
    ImageCaptionDataset,
    PreflightError,
    caption_length_report,
    collate,
    load_records,
    preflight,
    split_records,
    write_data_report,
)
from ghibli_lab.lora import adapted_models, attach_lora, save_lora
from ghibli_lab.loss import diffusion_loss, sample_noise, shard_randn
from ghibli_lab.pipeline import OfflineError, check_model_source, load_pipeline, training_scheduler
from ghibli_lab.sampling import save_samples
from ghibli_lab.tracking import Tracker

log = logging.getLogger(__name__)
register_configs()

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def train(cfg: DictConfig, run_dir: Path, group: str | None = None, name: str | None = None) -> dict:
    """Train one LoRA as ``cfg`` says, writing everything into ``run_dir``. Returns the summary."""
    start = time.time()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    # Bad input fails here, before any model loads.
    check_config(cfg)
    check_model_source(cfg.model)
    records = load_records(cfg.dataset, cfg.cache_dir)
    try:  # decode every image once: broken files are skipped and listed, never touched
        records, data_report = preflight(records, cfg.dataset.resolution)
    except PreflightError as err:
        write_data_report(run_dir, err.report)
        raise
    if data_report["skipped"]:
        log.warning("%d of %d files skipped (listed in data_report.json)", len(data_report["skipped"]), data_report["n_total"])
    train_records, holdout_records = split_records(records, cfg.dataset.holdout_fraction)
    if not train_records:
        raise ValueError(f"dataset {cfg.dataset.name!r} leaves no training images after the hold-out split")

    # Hydra runs multirun jobs in one process; accelerate's state is a per-process singleton.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum)
    set_seed(cfg.seed)
    device = accelerator.device
    weight_dtype = DTYPES[cfg.train.mixed_precision]
    if device.type == "cpu" and weight_dtype == torch.float16:
        weight_dtype = torch.float32  # CPU fp16 kernels are slow or missing; accelerate runs fp32 anyway

    stop = None
    # Resume: the newest complete checkpoint in this run dir (train.resume=auto) or a given one.
    resume_from = find_resume_checkpoint(cfg.train.resume, run_dir)
    resume_info = json.loads((resume_from / "loop_state.json").read_text()) if resume_from else {}
    if accelerator.is_main_process:  # metrics.jsonl keeps exactly the history the checkpoint has seen
        truncate_metrics(run_dir / "metrics.jsonl", after_step=resume_info.get("step", -1))
    tracker = Tracker(
        run_dir,
        cfg.logger,
        config=OmegaConf.to_container(cfg, resolve=True),
        group=group,
        name=name or run_dir.name,
        active=accelerator.is_main_process,
        resume_id=(resume_info.get("wandb") or {}).get("id"),
    )
    try:
        # Pipeline, then LoRA. Frozen weights in half precision when asked; LoRA params stay fp32
        # so the optimizer never sees fp16 gradients ("Attempting to unscale FP16 gradients").
        pipe = load_pipeline(cfg.model)
        data_report["captions"] = caption_length_report(records, pipe.tokenizer, pipe.tokenizer.model_max_length)
        if data_report["captions"]["too_long"]:
            log.warning(
                "%d captions exceed the text encoder's %d tokens and will be truncated (e.g. %s)",
                data_report["captions"]["too_long"], pipe.tokenizer.model_max_length, data_report["captions"]["examples"][0],
            )
        if accelerator.is_main_process:
            write_data_report(run_dir, data_report)
        params = attach_lora(pipe, cfg.lora)
        pipe.to(device)
        if weight_dtype != torch.float32:
            pipe.to(dtype=weight_dtype)
        if weight_dtype == torch.float16 and cfg.model.family == "sdxl" and not cfg.model.vae:
            pipe.vae.to(dtype=torch.float32)  # the stock SDXL VAE overflows in fp16 (NaNs, black images)
        models = adapted_models(pipe)
        set_train_mode(pipe, True)
        cast_training_params(list(models.values()), dtype=torch.float32)
        if device.type == "cuda":
            # TF32 tensor cores for the fp32 matmuls (LoRA weights, optimizer); bf16 ones are unaffected.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.train.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            pipe.unet.compile()  # in place: the pipeline (sampling, saving) keeps the same module
        if cfg.train.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            for model_name, model in models.items():
                if model_name != "unet":
                    model.gradient_checkpointing_enable()
        noise_scheduler = training_scheduler(pipe)
        n_trainable = sum(p.numel() for p in params)
        log.info(
            "LoRA rank %d alpha %g (scale alpha/rank = %.3g) on %s: %d trainable parameters",
            cfg.lora.rank, cfg.lora.alpha, cfg.lora.alpha / cfg.lora.rank, ", ".join(models), n_trainable,
        )

        # Data: latents and text embeddings from the shared content-keyed cache when it can stand
        # in for the encoders (see cache.py); otherwise pixels and captions, encoded every step.
        ds = cfg.dataset
        plan = cache_plan(ds, cfg.lora) if cfg.train.cache else {"latents": False, "text": False}
        cache_stats = {"encoded": 0, "reused": 0}
        if plan["latents"]:
            model_fp = fingerprint(cfg.model, weight_dtype)
            flips = (False, True) if ds.random_flip else (False,)
            cache_root = Path(cfg.cache_dir) / "encoded"
            with accelerator.main_process_first():  # one process encodes, the others then reuse
                args = (pipe, train_records, ds, cache_root, model_fp, flips, plan["text"], cache_stats)
                train_set = CachedDataset(encode_records(*args), seed=cfg.seed)
                args = (pipe, holdout_records, ds, cache_root, model_fp, (False,), plan["text"], cache_stats)
                val_set = CachedDataset(encode_records(*args))
            # The cache is complete: the VAE and frozen text encoders leave the device until sampling.
            offload_encoders(pipe, text=plan["text"])
            log.info("cache: %d entries encoded, %d reused", cache_stats["encoded"], cache_stats["reused"])
        else:
            log.info("no latent cache (train.cache=%s, dataset.center_crop=%s)", cfg.train.cache, ds.center_crop)
            train_set = ImageCaptionDataset(train_records, ds.resolution, ds.center_crop, ds.random_flip, seed=cfg.seed)
            val_set = ImageCaptionDataset(holdout_records, ds.resolution, center_crop=True, random_flip=False)
        # Each epoch's order depends only on (seed, epoch), so a resumed run can rebuild it.
        shuffle_generator = torch.Generator()
        loader = DataLoader(
            train_set,
            batch_size=cfg.train.batch_size,
            shuffle=True,
            collate_fn=collate,
            num_workers=cfg.train.num_workers,
            drop_last=len(train_set) >= cfg.train.batch_size,
            generator=shuffle_generator,
        )
        val_batches = encode_validation_set(pipe, val_set, cfg.train.batch_size)
        updates_per_epoch = math.ceil(len(loader) / cfg.train.grad_accum)
        max_steps = cfg.train.max_steps or cfg.train.epochs * updates_per_epoch
        log.info("%d training / %d held-out images; %d steps", len(train_records), len(holdout_records), max_steps)

        # Optimizer and schedule.
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.train.lr,
            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
            eps=cfg.train.adam_eps,
            weight_decay=cfg.train.weight_decay,
            fused=device.type == "cuda",  # one kernel for all LoRA tensors instead of one per tensor
        )
        lr_scheduler = get_scheduler(
            cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=max_steps
        )
        # The models are not DDP-wrapped: the forward runs under accelerate's autocast and the small
        # LoRA gradients are averaged across processes explicitly (average_gradients).
        optimizer, loader = accelerator.prepare(optimizer, loader)
        shard = (accelerator.process_index, accelerator.num_processes)

        # Loop, from the checkpoint's exact position when resuming.
        params_by_name = {f"{m}/{n}": p for m, model in models.items() for n, p in model.named_parameters() if p.requires_grad}
        name_of = {r.key: r.name for r in train_records}
        loop = {}
        if resume_from:
            loop = load_checkpoint(resume_from, params_by_name, optimizer, lr_scheduler, accelerator.scaler)
            log.info("resuming from %s (step %d, epoch %d)", resume_from, loop["step"], loop["epoch"])
        step, epoch, skip = loop.get("step", 0), loop.get("epoch", 0), loop.get("batches_in_epoch", 0)
        window_loss = torch.tensor(loop.get("window_loss", 0.0), device=device)
        window_n, skipped, bad_in_a_row = loop.get("window_n", 0), loop.get("skipped_batches", 0), 0
        train_loss, val_loss, first_val = loop.get("train_loss"), loop.get("val_loss"), loop.get("first_val")
        if not resume_from:
            first_val = val_loss = validation_loss(pipe, val_batches, noise_scheduler, cfg)
            if val_loss is not None:
                tracker.log({"val/loss": val_loss}, step=0)
        stop = install_stop_handlers()
        progress = tqdm(total=max_steps, initial=step, desc=f"train {run_dir.name}", disable=not accelerator.is_main_process)
        while step < max_steps:
            shuffle_generator.manual_seed(cfg.seed + epoch)
            # Through accelerate's loader: each iter() pushes its own epoch counter (0 in a freshly
            # resumed process) into the dataset's set_epoch, which keys the per-sample flips.
            loader.set_epoch(epoch)
            batches = iter(loader)
            for _ in range(skip):  # the batches the checkpointed run had already consumed
                next(batches)
            if loop:  # RNG last: positioning the loader must not shift it
                restore_rng(loop)
                loop = {}
            batches_in_epoch, skip = skip, 0
            for batch in batches:
                batches_in_epoch += 1
                with accelerator.accumulate(*models.values()):
                    with accelerator.autocast():
                        loss = training_loss(pipe, batch, noise_scheduler, weight_dtype, cfg, shard).mean()
                    # The one host sync per step: a NaN must be caught before the optimizer applies it.
                    if not torch.isfinite(loss):
                        files = ", ".join(name_of.get(k, k) for k in batch["key"])
                        if cfg.train.nonfinite == "stop":
                            raise FloatingPointError(
                                f"non-finite loss ({loss.item()}) at step {step + 1}, epoch {epoch}; the batch's "
                                f"samples: {files}. Lower train.lr, use train.mixed_precision=bf16 (fp16 overflows), "
                                f"or set train.nonfinite=skip to skip such batches."
                            )
                        log.warning("skipping batch with non-finite loss at step %d: %s", step + 1, files)
                        skipped += 1
                        bad_in_a_row += 1
                        if bad_in_a_row >= len(loader):
                            raise FloatingPointError(
                                f"every batch of an epoch gave a non-finite loss ({skipped} skipped so far); "
                                f"training can't make progress. Check train.lr, train.noise_offset and mixed precision."
                            )
                        optimizer.zero_grad(set_to_none=True)
                        continue
                    bad_in_a_row = 0
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        average_gradients(params, accelerator)
                        accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window_loss += loss.detach()  # no .item() here: no host sync inside the step
                window_n += 1
                if not accelerator.sync_gradients:
                    continue
                lr_scheduler.step()
                step += 1
                progress.update(1)
                if step % cfg.train.log_every == 0 or step == max_steps:
                    train_loss = accelerator.reduce(window_loss / window_n, reduction="mean").item()
                    tracker.log({"train/loss": train_loss, "train/lr": lr_scheduler.get_last_lr()[0], "train/epoch": epoch}, step)
                    progress.set_postfix(loss=f"{train_loss:.4f}")
                    window_loss, window_n = torch.zeros((), device=device), 0
                if every(step, cfg.train.val_every, max_steps) and val_batches:
                    val_loss = validation_loss(pipe, val_batches, noise_scheduler, cfg)
                    tracker.log({"val/loss": val_loss}, step)
                if every(step, cfg.train.sample_every) and accelerator.is_main_process:
                    path = write_samples(pipe, cfg, run_dir / "samples" / f"step_{step:06d}.png", weight_dtype)
                    tracker.log_image("samples/grid", path, step, caption="top: base, bottom: LoRA")
                stopping = stop["signal"] is not None
                if (every(step, cfg.train.checkpoint_every) and step < max_steps or stopping) and accelerator.is_main_process:
                    loop_state = {
                        "epoch": epoch,
                        "batches_in_epoch": batches_in_epoch,
                        "window_loss": window_loss.item(),
                        "window_n": window_n,
                        "skipped_batches": skipped,
                        "train_loss": train_loss,
                        "val_loss": val_loss,
                        "first_val": first_val,
                        "wandb": tracker.identity(),
                    }
                    keep = cfg.train.keep_checkpoints
                    save_checkpoint(run_dir, step, pipe, params_by_name, optimizer, lr_scheduler, accelerator.scaler, loop_state, keep)
                if stopping:
                    log.warning("stopped by signal %d at step %d; checkpoint written, resume with train.resume=auto", stop["signal"], step)
                    tracker.finish(exit_code=PREEMPTED_EXIT)
                    previous = stop["previous"].get(stop["signal"])
                    remove_stop_handlers(stop)
                    if callable(previous):  # e.g. submitit's handler, which requeues the job
                        previous(stop["signal"], None)
                    raise SystemExit(PREEMPTED_EXIT)
                if step >= max_steps:
                    break
            else:
                epoch += 1
        progress.close()

        # Save, then samples.
        accelerator.wait_for_everyone()
        summary = {}
        if accelerator.is_main_process:
            files = save_lora(pipe, run_dir / "lora")
            path = write_samples(pipe, cfg, run_dir / "samples" / "final.png", weight_dtype)
            tracker.log_image("samples/grid", path, step, caption="top: base, bottom: LoRA")
            wall = time.time() - start
            summary = {
                "steps": step,
                "epochs": round(step / updates_per_epoch, 3),
                "train/loss": train_loss,
                "val/loss": val_loss,
                "val/loss_initial": first_val,
                "lora/rank": cfg.lora.rank,
                "lora/alpha": cfg.lora.alpha,
                "lora/scale": cfg.lora.alpha / cfg.lora.rank,
                "trainable_params": n_trainable,
                "n_train": len(train_records),
                "n_holdout": len(holdout_records),
                "skipped_batches": skipped,
                "resumed_from": str(resume_from) if resume_from else None,
                "cache": {"latents": plan["latents"], "text": plan["latents"] and plan["text"], **cache_stats},
                "wall_time_s": round(wall, 2),
                "steps_per_s": round(step / wall, 3),
            }
            tracker.summary(summary)
            summary["lora_files"] = {k: str(v.relative_to(run_dir)) for k, v in files.items()}
            summary["wandb"] = tracker.identity()  # lets evaluation add to this run's W&B summary
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log.info("done: %s", run_dir)
        tracker.finish()
        return summary
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    finally:
        if stop is not None:
            remove_stop_handlers(stop)
        accelerator.free_memory()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after writing a checkpoint; requeue it


def install_stop_handlers() -> dict:
    """On SIGTERM, SIGUSR1 (a common `sbatch --signal` choice) or SIGUSR2 (submitit's pre-timeout
    signal) only note it: the loop finishes the current step, writes a checkpoint, closes W&B and
    then hands the signal to the handler it replaced (submitit's requeues the job), or exits with
    PREEMPTED_EXIT when there was none."""
    flag = {"signal": None, "previous": {}}

    def request_stop(signum, frame):
        flag["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        try:
            flag["previous"][sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: leave the default behaviour
            pass
    return flag


def remove_stop_handlers(flag: dict) -> None:
    for sig, handler in flag["previous"].items():
        signal.signal(sig, handler)


def find_resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """``auto``: the newest complete checkpoint in ``run_dir`` (None if there is none); a path:
    that checkpoint; null: start fresh. Incomplete checkpoints are reported and never used."""
    if not resume:
        return None
    if resume == "auto":
        path, partial = latest_checkpoint(run_dir)
        for p in partial:
            log.warning("ignoring incomplete checkpoint %s (no %s marker)", p, MARKER)
        if path is None:
            log.info("train.resume=auto: no checkpoint in %s, starting from step 0", run_dir)
        return path
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint dir (no {MARKER} marker)")
    return path


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop the rows a resumed run will write again (logged after its checkpoint)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)


def distributed_shard() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1) without it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def average_gradients(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Mean of the LoRA gradients over all processes, in one all-reduce (a no-op with one)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def every(step: int, interval: int, last: int | None = None) -> bool:
    """True every ``interval`` steps (0 = never), and at ``last`` when given."""
    return interval > 0 and (step % interval == 0 or step == last)


def encode_text(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings as the SD/SDXL pipelines compute them, but differentiable, so a
    text-encoder LoRA can train. SDXL: penultimate hidden states of both encoders, concatenated,
    plus the second encoder's pooled projection. SD 1.5: the last hidden state."""
    sdxl = hasattr(pipe, "text_encoder_2")
    pairs = [(pipe.tokenizer, pipe.text_encoder)] + ([(pipe.tokenizer_2, pipe.text_encoder_2)] if sdxl else [])
    embeds, pooled = [], None
    for tokenizer, encoder in pairs:
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=sdxl)
        embeds.append(out.hidden_states[-2] if sdxl else out[0])
        pooled = out[0]  # for SDXL's second encoder this is the pooled text projection
    return torch.cat(embeds, dim=-1), (pooled if sdxl else None)


def unet_prediction(pipe, noisy, timesteps, batch: dict, dtype) -> torch.Tensor:
    """Run the UNet with the batch's text (and, for SDXL, size) conditioning: cached embeddings
    when the batch carries them, else the captions through the text encoder(s)."""
    if "prompt_embeds" in batch:
        embeds, pooled = batch["prompt_embeds"].to(noisy.device), batch.get("pooled_prompt_embeds")
        pooled = pooled.to(noisy.device) if pooled is not None else None
    else:
        # Frozen text encoders run without autograd (set_train_mode keeps them in eval mode); on
        # SDXL a graph through both frozen encoders makes the second backward fail (stack-facts).
        with torch.set_grad_enabled(pipe.text_encoder.training and torch.is_grad_enabled()):
            embeds, pooled = encode_text(pipe, batch["caption"])
    kwargs = {}
    if pooled is not None:
        # SDXL micro-conditioning (Podell et al. 2023, sec. 2.2): original size, crop, target size.
        res = noisy.shape[-1] * pipe.vae_scale_factor
        n = noisy.shape[0]
        target = torch.full((n, 2), res, device=noisy.device, dtype=torch.long)  # no host-to-device copy
        time_ids = torch.cat([batch["original_size"].to(noisy.device), batch["crop_top_left"].to(noisy.device), target], dim=1)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
    return pipe.unet(noisy, timesteps, encoder_hidden_states=embeds.to(dtype), **kwargs).sample


def batch_latents(pipe, batch: dict, sample: bool = True, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Scaled latents of a batch: from cached posterior moments, or by encoding its pixels; a
    posterior sample (mean + std * eps, as DiagonalGaussianDistribution.sample) or the mean."""
    device = pipe.unet.device
    if "latent_moments" in batch:
        dist = DiagonalGaussianDistribution(batch["latent_moments"].to(device))
    else:
        with torch.no_grad():
            dist = pipe.vae.encode(batch["pixel_values"].to(pipe.vae.device, pipe.vae.dtype)).latent_dist
    latents = dist.mean.to(device)
    if sample:
        latents = latents + dist.std.to(device) * shard_randn(latents.shape, shard, device=device, dtype=latents.dtype)
    return latents * pipe.vae.config.scaling_factor


def training_loss(
    pipe, batch: dict, noise_scheduler, dtype: torch.dtype, cfg: DictConfig, shard: tuple[int, int] = (0, 1)
) -> torch.Tensor:
    """Per-sample loss of one batch at random timesteps: noise or v-prediction MSE, optionally
    min-SNR-γ weighted, with optional offset noise. ``shard`` = (process index, process count):
    random draws are made for the global batch and sliced (see loss.shard_randn)."""
    latents = batch_latents(pipe, batch, shard=shard).to(dtype)
    noise = sample_noise(latents, cfg.train.noise_offset, shard=shard)
    rank, world = shard
    b = latents.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b * world,), device=latents.device)
    timesteps = timesteps[rank * b : (rank + 1) * b]
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet_prediction(pipe, noisy, timesteps, batch, dtype)
    return diffusion_loss(pred, latents, noise, timesteps, noise_scheduler, cfg.train.snr_gamma)


def encode_validation_set(pipe, dataset, batch_size: int) -> list[dict]:
    """Held-out examples (center crop, no flip; pixels or cache entries) as fixed latents (the
    posterior mean), encoded once per run."""
    batches = []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        batch["latents"] = batch_latents(pipe, batch, sample=False)
        batch.pop("pixel_values", None)
        batch.pop("latent_moments", None)
        batches.append(batch)
    return batches


def offload_encoders(pipe, text: bool) -> None:
    """Move the VAE (and the frozen text encoders when their outputs are cached) off the device."""
    for name in ("vae", *(("text_encoder", "text_encoder_2") if text else ())):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to("cpu")


@contextmanager
def encoders_on(pipe, device: torch.device):
    """Every component on ``device`` inside the block (for sampling); previous devices restored."""
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    devices = [next(m.parameters()).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, d in zip(modules, devices):
            m.to(d)


@torch.no_grad()
def validation_loss(pipe, val_batches: list[dict], noise_scheduler, cfg: DictConfig) -> float | None:
    """Mean unweighted loss on the held-out set at fixed timesteps with fixed noise.

    The per-step training loss is dominated by the random timestep and shows no trend; this one
    only changes when the model does (as kohya's validation loss). Its noise comes from its own
    generators, so validating never changes the training trajectory. With several processes the
    batches are split between them and the sums all-reduced.
    """
    if not val_batches:
        return None
    unet = pipe.unet
    rank, world = distributed_shard()
    total = torch.zeros(2, dtype=torch.float64, device=unet.device)  # loss sum, sample count
    with eval_mode(pipe):
        for index in range(rank, len(val_batches), world):  # each process takes every world-th batch
            batch = val_batches[index]
            # Noise seeded per batch, so the number is the same however the batches are sharded.
            generator = torch.Generator("cpu").manual_seed(cfg.seed * 1_000_003 + index)
            latents = batch["latents"].to(unet.device, unet.dtype)
            for t in cfg.train.val_timesteps:
                noise = torch.randn(latents.shape, generator=generator).to(latents)
                timesteps = torch.full((latents.shape[0],), t, device=latents.device, dtype=torch.long)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                pred = unet_prediction(pipe, noisy, timesteps, batch, unet.dtype)
                loss = diffusion_loss(pred, latents, noise, timesteps, noise_scheduler, snr_gamma=None)
                total += torch.stack([loss.sum().double(), torch.tensor(loss.numel(), dtype=torch.float64, device=loss.device)])
    if world > 1:
        torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


def set_train_mode(pipe, training: bool) -> None:
    """Frozen components always in eval mode; the adapted ones in train mode only while training."""
    adapted = adapted_models(pipe)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.train(training and any(component is m for m in adapted.values()))


@contextmanager
def eval_mode(pipe):
    """Every component in eval mode (LoRA dropout off) inside the block; modes restored after."""
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def write_samples(pipe, cfg: DictConfig, path: Path, dtype: torch.dtype) -> Path:
    # Half-precision frozen weights with fp32 LoRA weights need autocast, as in training.
    autocast = torch.autocast(pipe.device.type, dtype=dtype, enabled=dtype != torch.float32)
    # Sampling must not shift the training RNG either.
    with eval_mode(pipe), encoders_on(pipe, pipe.unet.device), torch.random.fork_rng(devices=[]), autocast:
        return save_samples(
            pipe,
            path,
            prompts=[cfg.dataset.caption_prefix + p for p in cfg.sample.prompts],
            seeds=list(cfg.sample.seeds),
            scheduler=cfg.scheduler.name,
            steps=cfg.scheduler.steps,
            guidance_scale=cfg.guidance.scale,
            resolution=cfg.dataset.resolution,
        )


def update_latest(output_root: str | Path, target: Path) -> None:
    """Point ``<output_root>/latest`` at ``target`` (atomically: symlink to a temp name, rename)."""
    link = Path(output_root) / "latest"
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".latest.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()))
    os.replace(tmp, link)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch / torchrun: once
        update_latest(cfg.output_root, Path(hc.sweep.dir) if sweep else run_dir)
    try:
        summary = train(cfg, run_dir, group=Path(hc.sweep.dir).name if sweep else None, name=run_dir.name)
    except OfflineError as err:  # an expected failure offline: the message, not a stack trace
        raise SystemExit(f"ghibli_lab.train: {err}") from None
    return summary.get("val/loss")  # what a sweeper would minimise


if __name__ == "__main__":
    # Call main through the importable module, not as __main__: launchers that pickle the task
    # function (submitit) then pickle it by reference instead of by value with its globals.
    from ghibli_lab import train as _module

    _module.main()
