"""LoRA fine-tuning of SDXL / SD 1.5:  python -m ghibli_lab.train [overrides]   (-m for sweeps)

``train(cfg, run_dir)`` reads top to bottom: check → data split → accelerator → tracker and
preemption → pipeline → the method's weights (``method=lora|dora|full|dreambooth|textual_inversion``)
→ datasets → loop → summary. The step math lives in the library modules (``encode``, ``loss``,
``step``, ``loop``) and what each method trains in ``methods``; this module only composes them. Everything a
run produces lands in its run dir (see README, "Outputs").
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ghibli_lab.config import CONF_DIR, ConfigError, check_config, register_configs
from ghibli_lab.hub import OfflineError
from ghibli_lab.runs import ResumeMismatch, RunDirBusy, process_shard, update_latest

log = logging.getLogger(__name__)
register_configs()

def train(cfg: DictConfig, run_dir: Path, group: str | None = None, name: str | None = None) -> dict:
    """Train one adapter as ``cfg`` says, writing everything into ``run_dir``. Returns the summary."""
    start = time.time()
    check_config(cfg)
    # The heavy libraries (torch, diffusers, transformers, wandb) load only once the config is
    # known to be good, so a typo fails in about a second.
    from ghibli_lab import cache, data, loop, methods, pipeline, runs, step, tracking

    pipeline.check_model_source(cfg.model)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with runs.run_lock(run_dir, active=runs.process_shard()[0] == 0):  # one writer per run dir
        split = methods.with_trigger(data.load_split(cfg.dataset, cfg.cache_dir, run_dir), cfg.method)
        accelerator, dtype = step.make_accelerator(cfg.train.mixed_precision, cfg.train.grad_accum, cfg.seed)
        main_process = accelerator.is_main_process
        resume_from, resumed = loop.resume_point(cfg, run_dir, main_process)
        # A sweep job that differs from a finished one only in sampling keys reuses its weights.
        fingerprint = runs.weights_fingerprint(cfg)
        twin = runs.trained_twin(run_dir.parent, fingerprint) if group and not resume_from else None
        resume_id = (resumed.wandb or {}).get("id") if resumed else None
        with (
            loop.released(accelerator),
            tracking.tracking(run_dir, cfg, group, name, main_process, resume_id) as tracker,
            loop.preemption() as stop,
        ):
            if twin is not None:
                return loop.sample_only(cfg, run_dir, twin, accelerator, tracker, dtype, start)
            pipe = pipeline.load_pipeline(cfg.model)
            data.report_captions(split, pipe.tokenizer, run_dir, write=main_process)
            class_images = methods.class_records(pipe, cfg, accelerator.device, dtype)  # DreamBooth's prior
            params = methods.attach(pipe, cfg)
            step.prepare_for_training(pipe, cfg.train, accelerator.device, dtype)
            train_set, val_set, cache_stats = cache.build_datasets(pipe, split, cfg, dtype, accelerator, class_images)
            state = loop.fit(pipe, params, (train_set, val_set), cfg, accelerator, dtype, tracker, stop, run_dir, resume_from)
            extra = {
                "trainable_params": sum(p.numel() for p in params),
                "resumed_from": str(resume_from) if resume_from else None,
                "cache": cache_stats,
            }
            summary = loop.summarize(pipe, cfg, run_dir, split, state, extra, accelerator, tracker, dtype, start)
            if group and main_process:
                runs.record_trained(run_dir.parent, fingerprint, run_dir)
            return summary


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    try:
        summary = train(cfg, run_dir, group=Path(hc.sweep.dir).name if sweep else None, name=run_dir.name)
        if process_shard()[0] == 0:  # once under accelerate launch / torchrun; only after results exist
            from ghibli_lab.card import write_model_card

            write_model_card(run_dir)  # README.md, the Hub's model card (evaluation adds its metrics)
            update_latest(cfg.output_root, Path(hc.sweep.dir) if sweep else run_dir)
    except (ConfigError, OfflineError, ResumeMismatch, RunDirBusy) as err:  # expected: the message, no stack trace
        raise SystemExit(f"ghibli_lab.train: {err}") from None
    return summary.get("val/loss")  # what a sweeper would minimise


if __name__ == "__main__":
    # Call main through the importable module, not as __main__: launchers that pickle the task
    # function (submitit) then pickle it by reference instead of by value with its globals.
    from ghibli_lab import train as _module

    _module.main()
