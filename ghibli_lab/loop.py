"""The training loop: steps, logging, validation, samples, checkpoints, preemption, and the
run's closing files (adapter, samples, summary.json).

``fit`` continues from a checkpoint's exact position when resuming: the loader skips the batches
the checkpointed run had consumed, then every RNG is put back where it was, so N steps straight
and N/2 + resume + N/2 give the same losses and weights bit for bit.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ghibli_lab import methods
from ghibli_lab.adapters import adapted_models
from ghibli_lab.checkpoint import load_best, load_checkpoint, restore_rng, save_checkpoint
from ghibli_lab.data import Split
from ghibli_lab.encode import encode_validation_set, encoders_on, eval_mode
from ghibli_lab.loss import batch_mean, empty_prompt_embeddings, training_loss, validation_loss
from ghibli_lab.pipeline import load_pipeline, training_scheduler
from ghibli_lab.runs import ResumeMismatch, config_changes, find_resume_checkpoint, latest_checkpoint, training_config
from ghibli_lab.sampling import save_samples
from ghibli_lab.step import make_loader, make_optimizer, optimizer_step, peak_memory_mb, total_steps
from ghibli_lab.tracking import Tracker, truncate_metrics

log = logging.getLogger(__name__)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after writing a checkpoint; requeue it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
RNG_KEYS = ("python_rng", "numpy_rng", "torch_rng")


@dataclass
class LoopState:
    """Where the loop is. A checkpoint stores it (``loop_state.json``); a resumed run starts from it."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of this epoch already consumed
    window_loss: Any = 0.0  # sum of the losses since the last log (a device tensor while running)
    window_n: int = 0
    skipped_batches: int = 0  # non-finite batches skipped (train.nonfinite=skip)
    bad_in_a_row: int = 0
    steps_per_epoch: int = 0  # optimizer steps per epoch (set by fit), for summary.json's epochs
    train_loss: float | None = None
    val_loss: float | None = None
    first_val: float | None = None
    best_val: float | None = None  # early stopping (train.early_stop_patience): the best val/loss so far,
    best_step: int = 0  # the step it was reached at,
    bad_validations: int = 0  # validations since then without a better one,
    early_stopped: bool = False  # and whether the run stopped for that
    wandb: dict | None = None  # the W&B run to continue
    rng: dict = field(default_factory=dict)  # a checkpoint's RNG states, restored once the loader is positioned

    @classmethod
    def from_dict(cls, values: dict) -> "LoopState":
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in values.items() if k in names and k != "rng"})
        state.rng = {k: values[k] for k in RNG_KEYS if k in values}
        return state

    def to_dict(self) -> dict:
        """What a checkpoint stores (``save_checkpoint`` adds the step and the RNG states)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("step", "rng")}
        values["window_loss"] = float(self.window_loss)
        return values


def resume_point(cfg: DictConfig, run_dir: Path, main_process: bool) -> tuple[Path | None, LoopState | None]:
    """The checkpoint to resume from (``train.resume``) and its loop state; metrics.jsonl is cut
    back to exactly the history that checkpoint has seen. A checkpoint written under another
    training config is refused, naming the keys that differ (``runs.RESUME_SAFE_KEYS`` may)."""
    path = find_resume_checkpoint(cfg.train.resume, run_dir)
    saved = json.loads((path / "loop_state.json").read_text()) if path else {}
    if path and "config" in saved:
        changes = config_changes(saved["config"], training_config(OmegaConf.to_container(cfg, resolve=True)))
        if changes:
            raise ResumeMismatch(
                f"checkpoint {path} was trained with another config; resuming would train a different "
                f"model than .hydra/config.yaml says. Changed: " + "; ".join(changes)
                + ". Restore these values, or start a new run dir. (Safe to change on resume: train.max_steps, "
                "train.epochs, logging, validation, sampling and checkpoint intervals.)"
            )
    elif path:
        log.warning("checkpoint %s records no config (written by an older version): not checked", path)
    state = LoopState.from_dict(saved) if path else None
    if main_process:
        truncate_metrics(run_dir / "metrics.jsonl", after_step=state.step if state else -1)
    return path, state


@contextmanager
def preemption() -> Iterator[dict]:
    """On SIGTERM, SIGUSR1 (a common `sbatch --signal` choice) or SIGUSR2 (submitit's pre-timeout
    signal) only note it: the loop finishes the current step, writes a checkpoint, closes W&B and
    then hands the signal to the handler it replaced (submitit's requeues the job), or exits with
    PREEMPTED_EXIT when there was none. Handlers are restored on leaving the block."""
    stop = {"signal": None, "previous": {}}

    def request_stop(signum, frame):
        stop["signal"] = signum

    for sig in STOP_SIGNALS:
        try:
            stop["previous"][sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: leave the default behaviour
            pass
    try:
        yield stop
    finally:
        _restore_handlers(stop)


def _restore_handlers(stop: dict) -> None:
    for sig, handler in stop["previous"].items():
        signal.signal(sig, handler)
    stop["previous"] = {}


@contextmanager
def released(accelerator: Accelerator) -> Iterator[None]:
    """Give device memory back when the run ends, however it ends (a sweep runs the next job next)."""
    try:
        yield
    finally:
        accelerator.free_memory()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def every(step: int, interval: int, last: int | None = None) -> bool:
    """True every ``interval`` steps (0 = never), and at ``last`` when given."""
    return interval > 0 and (step % interval == 0 or step == last)


def trainable_by_name(pipe: DiffusionPipeline) -> dict[str, torch.nn.Parameter]:
    return {f"{m}/{n}": p for m, model in adapted_models(pipe).items() for n, p in model.named_parameters() if p.requires_grad}


def epochs(loader, shuffle: torch.Generator, state: LoopState, seed: int) -> Iterator[dict]:
    """Batches, epoch after epoch, from ``state``'s position. Each epoch's order depends only on
    (seed, epoch), so a resumed run rebuilds it and skips what its checkpoint had consumed."""
    while True:
        shuffle.manual_seed(seed + state.epoch)
        # Through accelerate's loader: each iter() pushes its own epoch counter (0 in a freshly
        # resumed process) into the dataset's set_epoch, which keys the per-sample flips.
        loader.set_epoch(state.epoch)
        batches = iter(loader)
        for _ in range(state.batches_in_epoch):
            next(batches)
        if state.rng:  # RNG last: positioning the loader must not shift it
            restore_rng(state.rng)
            state.rng = {}
        for batch in batches:
            state.batches_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batches_in_epoch = 0


def fit(
    pipe: DiffusionPipeline,
    params: list[torch.nn.Parameter],
    datasets: tuple,
    cfg: DictConfig,
    accelerator: Accelerator,
    dtype: torch.dtype,
    tracker: Tracker,
    stop: dict,
    run_dir: Path,
    resume_from: Path | None,
) -> LoopState:
    """Train until ``train.max_steps`` (or ``epochs``); return the final loop state."""
    t, device = cfg.train, accelerator.device
    train_set, val_set = datasets
    noise_scheduler = training_scheduler(pipe)
    shuffle = torch.Generator()
    loader = make_loader(train_set, t, shuffle)
    val_batches = encode_validation_set(pipe, val_set, t.batch_size)
    max_steps, per_epoch = total_steps(t, len(loader))
    log.info("%d training / %d held-out images; %d steps", len(train_set), len(val_set), max_steps)
    optimizer, lr_scheduler = make_optimizer(params, t, device, max_steps, lr=methods.learning_rate(cfg))
    optimizer, loader = accelerator.prepare(optimizer, loader)
    named = trainable_by_name(pipe)

    uncond = empty_prompt_embeddings(pipe) if t.loss_guidance != 1.0 else None
    patience = t.early_stop_patience if val_batches else None
    best: dict[str, torch.Tensor] = {}  # early stopping: the best weights so far, on the CPU

    def validate() -> float | None:
        return validation_loss(pipe, val_batches, noise_scheduler, list(t.val_timesteps), cfg.seed)

    if resume_from:
        state = LoopState.from_dict(load_checkpoint(resume_from, named, optimizer, lr_scheduler, accelerator.scaler))
        best = load_best(resume_from)
        log.info("resuming from %s (step %d, epoch %d)", resume_from, state.step, state.epoch)
    else:
        state = LoopState()
        state.first_val = state.val_loss = validate()
        if state.val_loss is not None:
            tracker.log({"val/loss": state.val_loss}, step=0)
            if patience:
                track_best(state, named, best)
    state.window_loss = torch.tensor(state.window_loss, device=device)
    state.steps_per_epoch = per_epoch
    shard = (accelerator.process_index, accelerator.num_processes)
    progress = tqdm(total=max_steps, initial=state.step, desc=f"train {run_dir.name}", disable=not accelerator.is_main_process)
    for batch in epochs(loader, shuffle, state, cfg.seed):
        if state.step >= max_steps:
            break
        with accelerator.accumulate(*adapted_models(pipe).values()):
            with accelerator.autocast():
                per_sample = training_loss(pipe, batch, noise_scheduler, dtype, t.noise_offset, t.snr_gamma, shard, t.loss_guidance, uncond)
                loss = batch_mean(per_sample, batch)
            # The one host sync per step: a NaN must be caught before the optimizer applies it.
            if not torch.isfinite(loss):
                skip_nonfinite(loss, batch, state, t.nonfinite, len(loader))
                optimizer.zero_grad(set_to_none=True)
                continue
            state.bad_in_a_row = 0
            optimizer_step(loss, params, optimizer, accelerator, t.max_grad_norm)
        state.window_loss += loss.detach()  # no .item() here: no host sync inside the step
        state.window_n += 1
        if not accelerator.sync_gradients:
            continue
        lr_scheduler.step()
        state.step += 1
        progress.update(1)
        step = state.step
        if every(step, t.log_every, max_steps):
            state.train_loss = accelerator.reduce(state.window_loss / state.window_n, reduction="mean").item()
            tracker.log({"train/loss": state.train_loss, "train/lr": lr_scheduler.get_last_lr()[0], "train/epoch": state.epoch}, step)
            progress.set_postfix(loss=f"{state.train_loss:.4f}")
            state.window_loss, state.window_n = torch.zeros((), device=device), 0
        if every(step, t.val_every, max_steps) and val_batches:
            state.val_loss = validate()
            tracker.log({"val/loss": state.val_loss}, step)
            if patience:
                track_best(state, named, best)
                state.early_stopped = state.bad_validations >= patience and step < max_steps
        if every(step, t.sample_every) and accelerator.is_main_process:
            path = write_samples(pipe, cfg, run_dir / "samples" / f"step_{step:06d}.png", dtype)
            tracker.log_image("samples/grid", path, step, caption=f"top: base, bottom: {cfg.method.name}")
        stopping = stop["signal"] is not None
        saved = None
        if (every(step, t.checkpoint_every) and step < max_steps or stopping) and accelerator.is_main_process:
            state.wandb = tracker.identity()
            loop_state = {**state.to_dict(), "config": training_config(OmegaConf.to_container(cfg, resolve=True))}
            # A LoRA-sized method also gets a loadable copy in the checkpoint; a full fine-tune's
            # weights are already there once (trainable.safetensors).
            export = None if cfg.method.weights == "full" else lambda out: methods.save(pipe, cfg, out, torch.float32)
            saved = save_checkpoint(run_dir, step, named, optimizer, lr_scheduler, accelerator.scaler, loop_state, t.keep_checkpoints, export, best)
        if stopping:
            preempted(stop, state, tracker, saved, run_dir)
        if state.early_stopped:
            log.info(
                "early stop at step %d: val/loss has not improved for %d validations (best %.5g at step %d)",
                step, state.bad_validations, state.best_val, state.best_step,
            )
            break
        if state.step >= max_steps:
            break
    progress.close()
    if best and state.best_step != state.step:  # the run keeps (and exports) its best weights
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(best[name].to(param.device, param.dtype))
        log.info("kept the best weights: step %d, val/loss %.5g (the last validation: %.5g)", state.best_step, state.best_val, state.val_loss)
    return state


def track_best(state: LoopState, named: dict[str, torch.nn.Parameter], best: dict[str, torch.Tensor]) -> None:
    """Early stopping's bookkeeping after a validation: a better val/loss becomes the best (its
    weights copied to the CPU), anything else counts against the patience."""
    if state.best_val is None or state.val_loss < state.best_val:
        state.best_val, state.best_step, state.bad_validations = state.val_loss, state.step, 0
        best.update({name: p.detach().to("cpu", copy=True) for name, p in named.items()})
    else:
        state.bad_validations += 1


def skip_nonfinite(loss: torch.Tensor, batch: dict, state: LoopState, policy: str, n_batches: int) -> None:
    """``train.nonfinite=stop``: raise, naming the batch's files; ``skip``: count the batch, and
    give up when a whole epoch's worth in a row was non-finite."""
    files = ", ".join(batch["name"])
    if policy == "stop":
        raise FloatingPointError(
            f"non-finite loss ({loss.item()}) at step {state.step + 1}, epoch {state.epoch}; the batch's "
            f"samples: {files}. Lower train.lr, use train.mixed_precision=bf16 (fp16 overflows), "
            f"or set train.nonfinite=skip to skip such batches."
        )
    log.warning("skipping batch with non-finite loss at step %d: %s", state.step + 1, files)
    state.skipped_batches += 1
    state.bad_in_a_row += 1
    if state.bad_in_a_row >= n_batches:
        raise FloatingPointError(
            f"every batch of an epoch gave a non-finite loss ({state.skipped_batches} skipped so far); "
            f"training can't make progress. Check train.lr, train.noise_offset and mixed precision."
        )


def preempted(stop: dict, state: LoopState, tracker: Tracker, saved: Path | None, run_dir: Path) -> None:
    """After the stop checkpoint: close W&B, hand the signal on (submitit requeues), exit 75."""
    signum = stop["signal"]
    if saved is not None:
        log.warning("stopped by signal %d at step %d; checkpoint written, resume with train.resume=auto", signum, state.step)
    else:
        previous = latest_checkpoint(run_dir)[0]
        log.error(
            "stopped by signal %d at step %d, but NO checkpoint could be written (see above); train.resume=auto "
            "will continue from %s", signum, state.step, previous.name if previous else "step 0 (there is no earlier checkpoint)",
        )
    tracker.finish(exit_code=PREEMPTED_EXIT)
    previous = stop["previous"].get(signum)
    _restore_handlers(stop)
    if callable(previous):  # e.g. submitit's handler, which requeues the job
        previous(signum, None)
    raise SystemExit(PREEMPTED_EXIT)


def write_samples(pipe: DiffusionPipeline, cfg: DictConfig, path: Path, dtype: torch.dtype) -> Path:
    """Base and adapter images at the configured prompts and seeds, without shifting the training RNG."""
    # Half-precision frozen weights with fp32 LoRA weights need autocast, as in training.
    autocast = torch.autocast(pipe.device.type, dtype=dtype, enabled=dtype != torch.float32)
    with eval_mode(pipe), encoders_on(pipe, pipe.unet.device), torch.random.fork_rng(devices=[]), autocast:
        return save_samples(
            pipe,
            path,
            prompts=[cfg.dataset.caption_prefix + p for p in cfg.sample.prompts],
            trained_prompts=[methods.prompt_text(cfg.method, cfg.dataset.caption_prefix + p) for p in cfg.sample.prompts],
            seeds=list(cfg.sample.seeds),
            scheduler=cfg.scheduler.name,
            steps=cfg.scheduler.steps,
            guidance_scale=cfg.guidance.scale,
            resolution=cfg.dataset.resolution,
        )


def sample_only(cfg: DictConfig, run_dir: Path, twin: Path, accelerator: Accelerator, tracker: Tracker, dtype: torch.dtype, start: float) -> dict:
    """A sweep job whose training config equals the finished job ``twin``'s (they differ only in
    sampling keys: scheduler, guidance, sample prompts): take its weights and training history,
    and only sample with this job's settings. summary.json says ``trained_by``."""
    log.info("%s: same training config as %s, which already trained it: reusing its weights, sampling only", run_dir.name, twin.name)
    if not accelerator.is_main_process:
        return {}
    shutil.copytree(methods.weights_dir(twin, cfg), methods.weights_dir(run_dir, cfg), dirs_exist_ok=True)
    history = [json.loads(line) for line in (twin / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for row in history:  # the training curve into this job's metrics.jsonl and W&B run too
        tracker.log({k: v for k, v in row.items() if k != "step"}, row["step"])
    pipe = load_pipeline(cfg.model).to(accelerator.device)
    with methods.applied(pipe, methods.weights_dir(run_dir, cfg)):
        path = write_samples(pipe, cfg, run_dir / "samples" / "final.png", dtype)
    summary = json.loads((twin / "summary.json").read_text())
    tracker.log_image("samples/grid", path, summary["steps"], caption=f"top: base, bottom: {cfg.method.name}")
    wall = time.time() - start
    summary.update({"trained_by": twin.name, "sampling_wall_time_s": round(wall, 2)})
    tracker.summary({k: v for k, v in summary.items() if not isinstance(v, dict)})
    summary["wandb"] = tracker.identity()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarize(
    pipe: DiffusionPipeline,
    cfg: DictConfig,
    run_dir: Path,
    split: Split,
    state: LoopState,
    extra: dict,
    accelerator: Accelerator,
    tracker: Tracker,
    dtype: torch.dtype,
    start: float,
) -> dict:
    """Save the adapter and the final samples; write summary.json (main process; {} elsewhere)."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    files = methods.save(pipe, cfg, run_dir, dtype=SAVE_DTYPES[cfg.lora.save_dtype])
    path = write_samples(pipe, cfg, run_dir / "samples" / "final.png", dtype)
    tracker.log_image("samples/grid", path, state.step, caption=f"top: base, bottom: {cfg.method.name}")
    lora = cfg.method.weights in ("lora", "dora")
    memory = peak_memory_mb(accelerator.device)
    stopping = cfg.train.early_stop_patience is not None and state.best_val is not None
    wall = time.time() - start
    summary = {
        "steps": state.step,
        "epochs": round(state.step / state.steps_per_epoch, 3),
        "train/loss": state.train_loss,
        "val/loss": state.val_loss,
        "val/loss_initial": state.first_val,
        # Early stopping: the exported weights are those of weights_step, the best validation.
        "val/loss_best": state.best_val if stopping else None,
        "weights_step": state.best_step if stopping else state.step,
        "early_stopped": state.early_stopped,
        "method": cfg.method.name,
        "lora/rank": cfg.lora.rank if lora else None,
        "lora/alpha": cfg.lora.alpha if lora else None,
        "lora/scale": cfg.lora.alpha / cfg.lora.rank if lora else None,
        # What the method costs: the report's cost columns.
        "trainable_params": extra["trainable_params"],
        "weights_bytes": sum(f.stat().st_size for f in files.values()),
        "peak_memory_mb": memory[0],
        "peak_memory_source": memory[1],
        "n_train": len(split.train),
        "n_holdout": len(split.holdout),
        "skipped_batches": state.skipped_batches,
        "resumed_from": extra["resumed_from"],
        "cache": extra["cache"],
        "wall_time_s": round(wall, 2),
        "steps_per_s": round(state.step / wall, 3),
    }
    tracker.summary(summary)
    summary["weights_files"] = {k: str(v.relative_to(run_dir)) for k, v in files.items()}
    summary["wandb"] = tracker.identity()  # lets evaluation add to this run's W&B summary
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("done: %s", run_dir)
    return summary
