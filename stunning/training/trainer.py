"""`train_style`: one LoRA style adapter (diffusers + peft + accelerate), resumable and reproducible.

:func:`train_style` loads the base pipeline through its model family, freezes it, adds a
PEFT LoRA adapter to the denoiser and trains only the adapter on the style's curated train
images (the loop: :mod:`stunning.training.loop`). Around the loop it keeps the books: the
checkpoint fingerprint (config, data, base model and this package's code), the tracker run
with its params and metrics, the adapter saved in the diffusers LoRA layout (loadable with
stock `pipe.load_lora_weights(dir)`) next to the resolved `train_config.yaml`, the final
sample images, and the summary the `train` stage reports.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from stunning.config import TrainConfig, dump_resolved
from stunning.io import atomic_dir
from stunning.tracking import NullTracker, Tracker
from stunning.training.checkpoint import CheckpointStore, fingerprint
from stunning.training.dataset import CuratedDataset, style_rows
from stunning.training.divergence import TrainingDiverged
from stunning.training.dreambooth import class_images_dir, trigger_words
from stunning.training.loop import LoopResult, StepCallback, TrainJob, run_training
from stunning.training.quantized import BasePrecision, resolve_base_precision
from stunning.training.samples import SAMPLE_SEEDS, write_samples
from stunning.training.thermal import ThermalProbe

log = logging.getLogger(__name__)

# The diffusion loss of one batch swings with the drawn timesteps, so the reported final
# loss averages the last few steps.
FINAL_LOSS_WINDOW = 10
# Config keys that never change the trained weights (bookkeeping, and sampling, which runs
# on its own generators and a forked global RNG); left out of the checkpoint fingerprint so
# changing them still resumes.
NON_NUMERIC_KEYS = frozenset({
    "checkpoint_every", "keep_checkpoints", "sample_every", "sample_prompt",
    # Pausing for heat delays steps but never changes them.
    "thermal_check_every", "thermal_pause_s", "thermal_max_pause_s",
})


def train_style(
    base_path: str | Path,
    family,
    curated_dir: str | Path,
    style: str,
    cfg: TrainConfig,
    out_dir: str | Path,
    tracker: Tracker | None,
    checkpoint_dir: str | Path | None,
    device: str | torch.device | None = None,
    *,
    samples_dir: str | Path | None = None,
    sample_seeds: Sequence[int] = SAMPLE_SEEDS,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    on_step: StepCallback | None = None,
    progress: bool | None = None,
    cache_dir: str | Path | None = None,
    thermal_probe: ThermalProbe | None = None,
    class_dir: str | Path | None = None,
    research: Mapping[str, Any] | None = None,
    research_source: str = "the research report",
) -> dict[str, Any]:
    """Train one LoRA adapter for `style`; save it to `out_dir/<style>/`; return a summary.

    `family` is a :class:`stunning.families.Family` or its name. `checkpoint_dir=None`
    disables checkpointing (and resuming). One final sample image per seed in
    `sample_seeds` (none if empty) goes to the tracker and, if given, to
    `samples_dir/<style>/`. The tracker run is `run_name` (default `train-<style>`), tagged
    with style, stage and fingerprint plus `tags`. `on_step(step, loss)` is called after
    every optimizer step; an exception raised there stops the run like a crash would (the
    newest checkpoint survives). `progress=None` shows the progress bar only on a terminal.
    `cache_dir` keeps encoded images and captions on disk, keyed by content
    (`stunning.training.cache`); None encodes everything in memory each run.
    `thermal_probe` replaces :func:`stunning.device.thermal_state` as the thermal guard's
    source of the OS thermal state (tests feed captured states through it).
    `class_dir` keeps the generated class images of DreamBooth prior preservation (default:
    `<cache_dir>/class-images`, else `<checkpoint_dir>/class-images`, else a temporary folder).
    `research` is the research report (`reports/research.json`, read from `research_source`):
    `train.base_precision: auto` trains at its plan's precision
    (:func:`~stunning.training.quantized.resolve_base_precision`).

    The summary holds `final_loss` (mean of the last few steps' losses), `val_loss` and
    `base_val_loss` (the same fixed-noise objective on the val split with and without the
    adapter; None without val images), `steps`, `steps_per_s`, `images_per_s` (of the steps
    run in this call; None if none ran), `peak_memory_mb`, `mlflow_run_id`, `seconds`,
    `adapter`, `resumed_from_step`, `fingerprint`, `device`, `mixed_precision`, `loss_history`,
    `batch_size` (the one in use at the end: `batch_size: auto` resolved, after any halving),
    `batch_backoffs` (steps redone with half the batch after running out of memory),
    `thermal_checks`, `thermal_throttled_checks` and `thermal_paused_s` (of this call),
    `base_precision` (the frozen base's precision, `auto` resolved), `base_precision_requested`,
    `base_precision_source` and `base_quantization_backend`, and
    after a divergence rollback `divergence_retries` and `learning_rate_final` (the lowered rate).

    A run whose loss or gradients go non-finite rolls back and retries at half the learning
    rate (`train.max_divergence_retries` times), then raises
    :class:`~stunning.training.divergence.TrainingDiverged`; no adapter with a non-finite
    value is ever written.
    """
    from stunning.device import PeakMemory, select_device
    from stunning.families import get_family

    t_start = time.perf_counter()
    fam = get_family(family) if isinstance(family, str) else family
    base_path, curated_dir, out_dir = Path(base_path), Path(curated_dir), Path(out_dir)
    dev = select_device(None if device is None else str(device))
    base = resolve_base_precision(cfg, dev, research, research_source)
    mixed_precision = base.mixed_precision
    tracker = tracker or NullTracker()

    train_set = CuratedDataset(curated_dir, style, "train")
    val_set = CuratedDataset(curated_dir, style, "val", allow_empty=True)
    fp = _fingerprint(fam, base_path, curated_dir, style, cfg, base)
    store = CheckpointStore.for_run(Path(checkpoint_dir), style, fp, cfg.keep_checkpoints) if checkpoint_dir else None

    run_tags = {"style": style, "stage": "train", "fingerprint": fp, **(tags or {})}
    run_id = tracker.start_run(run_name or f"train-{style}", tags=run_tags)
    status = "FAILED"
    threads_before = torch.get_num_threads()  # the loop may lower it for a small model
    try:
        tracker.log_params(
            {
                **{f"train.{k}": v for k, v in cfg.model_dump().items()},
                "style": style,
                "base": str(base_path),
                "family": fam.name,
                "n_images": len(train_set),
                "n_val_images": len(val_set),
                "device": str(dev),
                "mixed_precision": mixed_precision,
                "fingerprint": fp,
                **base.as_dict(),
            }
        )
        job = TrainJob(
            fam, base_path, train_set, val_set, style, cfg, dev, base, store, tracker,
            on_step=on_step,
            progress=progress,
            cache_dir=Path(cache_dir) if cache_dir is not None else None,
            thermal_probe=thermal_probe,
            class_dir=class_images_dir(class_dir, cache_dir, checkpoint_dir),
        )
        with PeakMemory(dev) as pm:
            result = run_training(job)
        if dev.type == "cpu":
            tracker.log_params({"cpu_threads": torch.get_num_threads()})
        steps_run = cfg.steps - result.start_step
        steps_per_s = steps_run / result.loop_seconds if steps_run and result.loop_seconds > 0 else None
        images_per_s = result.images / result.loop_seconds if steps_per_s else None
        run_facts = {"batch_size": result.batch_size, "batch_backoffs": result.batch_backoffs, **result.thermal}
        if result.divergence_retries:  # only for runs that diverged: the summary of the others is unchanged
            run_facts.update(divergence_retries=result.divergence_retries, learning_rate_final=result.learning_rate)

        adapter_dir = _save_adapter(fam, result, cfg, style, out_dir, base_path, fp, base)
        samples = write_samples(fam, result.pipe, cfg, style, samples_dir, sample_seeds) if sample_seeds else None
        window = result.history[-FINAL_LOSS_WINDOW:]
        final_loss = sum(window) / len(window)
        metrics = {
            "final_loss": final_loss,
            "peak_memory_mb": pm.peak_mb,
            "peak_memory_delta_mb": pm.delta_mb,
            "seconds": time.perf_counter() - t_start,
            **run_facts,
        }
        if steps_per_s is not None:
            metrics.update(steps_per_s=steps_per_s, images_per_s=images_per_s)
        if result.val_loss is not None:
            metrics.update(val_loss=result.val_loss, base_val_loss=result.base_val_loss)
        tracker.log_metrics(metrics)
        tracker.log_artifact(adapter_dir, "adapter")
        if samples is not None:
            tracker.log_artifact(samples, "samples")
            if samples_dir is None:
                shutil.rmtree(samples, ignore_errors=True)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        torch.set_num_threads(threads_before)
        tracker.end_run(status)

    summary = {
        "final_loss": final_loss,
        "val_loss": result.val_loss,
        "base_val_loss": result.base_val_loss,
        "steps": cfg.steps,
        "steps_per_s": steps_per_s,
        "images_per_s": images_per_s,
        "peak_memory_mb": pm.peak_mb,
        "mlflow_run_id": run_id,
        "seconds": time.perf_counter() - t_start,
        "adapter": str(adapter_dir / "pytorch_lora_weights.safetensors"),
        "resumed_from_step": result.start_step,
        "fingerprint": fp,
        "device": str(dev),
        "mixed_precision": result.mixed_precision,  # on a CPU with auto: what calibration chose
        "n_images": len(train_set),
        "loss_history": result.history,
        **base.as_dict(),
        **run_facts,
    }
    _log_summary(style, summary)
    return summary


def _fingerprint(
    fam, base_path: Path, curated_dir: Path, style: str, cfg: TrainConfig, base: BasePrecision
) -> str:
    """The checkpoint fingerprint: what changes the trained weights (numeric config with
    `base_precision: auto` resolved, base model, the style's curated rows and images, family,
    style and this package's code)."""
    # max_batch_size only matters when the batch size is probed.
    exclude = set(NON_NUMERIC_KEYS) | ({"max_batch_size"} if cfg.batch_size != "auto" else set())
    # base_precision with auto resolved: a new plan never resumes a stale run.
    return fingerprint(
        {**cfg.model_dump(exclude=exclude), "base_precision": base.precision},
        base_path,
        style_rows(curated_dir, style),
        curated_dir,
        extra={"family": fam.name, "style": style, "code": _code_identity(fam)},
    )


def _log_summary(style: str, summary: dict[str, Any]) -> None:
    val_loss, steps_per_s = summary["val_loss"], summary["steps_per_s"]
    log.info(
        "%s: %d steps, final loss %.4f, val loss %s, %s steps/s, peak %.0f MB, batch %d, paused %.0f s for heat",
        style,
        summary["steps"],
        summary["final_loss"],
        "n/a" if val_loss is None else f"{val_loss:.4f}",
        "n/a" if steps_per_s is None else f"{steps_per_s:.2f}",
        summary["peak_memory_mb"],
        summary["batch_size"],
        summary["thermal_paused_s"],
    )


def _save_adapter(
    fam, result: LoopResult, cfg: TrainConfig, style: str, out_dir: Path, base_path: Path, fp: str,
    base: BasePrecision,
) -> Path:
    """Write the adapter (diffusers LoRA layout, with its metadata) and the resolved config to
    `out_dir/<style>/`, atomically; the folder."""
    adapter_dir = out_dir / style
    _check_finite(fam, result, style, cfg)
    with atomic_dir(adapter_dir) as tmp:
        fam.save_lora(result.pipe, tmp, metadata={
            "style": style,
            "training_hash": fp,
            "base_model": str(base_path),
            "family": fam.name,
            "rank": cfg.rank,
            "alpha": cfg.alpha,
            "target_modules": cfg.target_modules,
            "target_blocks": cfg.target_blocks,
            "trigger_words": trigger_words(cfg),
            "steps": cfg.steps,
            "batch_size": result.batch_size,
            # The precision the frozen base was trained at (QLoRA: int8/int4); the adapter
            # itself is float32 and loads on the unquantized base.
            "base_precision": base.precision,
            "base_quantization_backend": base.as_dict()["base_quantization_backend"],
        })
        dump_resolved(cfg, tmp / "train_config.yaml")
    return adapter_dir


def _check_finite(fam, result: LoopResult, style: str, cfg: TrainConfig) -> None:
    """The last line of defence: refuse to write an adapter holding NaN or infinite values."""
    bad = [f"{comp}.{key}" for comp, layers in fam.lora_layers(result.pipe).items() for key, t in sorted(layers.items())
           if not bool(torch.isfinite(t).all())]
    if bad:
        lr = result.learning_rate if result.learning_rate is not None else cfg.learning_rate
        raise TrainingDiverged(
            f"{style}: the trained adapter holds non-finite values in {len(bad)} tensor(s) (e.g. {bad[0]}); "
            f"refusing to save it. Lower train.learning_rate (e.g. to {lr / 10:g}) or use train.mixed_precision "
            "bf16 or no instead of fp16."
        )


def _code_identity(fam) -> dict[str, str]:
    """Hashes of the training code and versions of the libraries that shape the numbers.

    Part of the checkpoint fingerprint: a checkpoint is only resumed by the code that wrote
    it, so a fixed bug or an upgraded library never continues (or reuses) a stale run.
    """
    import hashlib
    import importlib.metadata
    import inspect

    files = sorted(Path(__file__).parent.glob("*.py"))
    family_file = inspect.getsourcefile(type(fam))
    if family_file:
        files.append(Path(family_file))
    ident = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files}
    for lib in ("torch", "diffusers", "peft", "accelerate"):
        ident[lib] = importlib.metadata.version(lib)
    return ident
