"""LoRA training of one style adapter (diffusers + peft + accelerate), resumable and reproducible.

:func:`train_style` loads the base pipeline through its model family, freezes it, adds a
PEFT LoRA adapter to the denoiser and trains only the adapter on the style's curated train
images. The VAE and the text encoder are frozen, so the latents and prompt embeddings of the
train (and val) images are computed once before the loop; each step then costs one denoiser
forward/backward. All randomness goes through explicit generators seeded from `train.seed`
(batch indices on a CPU generator, noise and timesteps on a generator of the compute device)
whose states are checkpointed with the weights, so a resumed run continues exactly where the
interrupted one stopped. The result is saved in the diffusers LoRA layout (loadable with
stock `pipe.load_lora_weights(dir)`) next to the resolved `train_config.yaml`; losses,
throughput, peak memory, sample images and the adapter go to the experiment tracker.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from stunning.config import TrainConfig, dump_resolved
from stunning.io import atomic_dir
from stunning.tracking import NullTracker, Tracker
from stunning.training.cache import EncodingCache
from stunning.training.checkpoint import CheckpointStore, fingerprint
from stunning.training.dataset import CuratedDataset, style_rows

log = logging.getLogger(__name__)

# Gradient-norm clipping as in diffusers' LoRA example scripts; keeps a high learning rate
# from blowing up the adapter on the first steps.
MAX_GRAD_NORM = 1.0
ENCODE_BATCH = 16
# The diffusion loss of one batch swings with the drawn timesteps, so the reported final
# loss averages the last few steps and the val loss averages several noise draws.
FINAL_LOSS_WINDOW = 10
VAL_REPEATS = 4
SAMPLE_SEEDS = (0, 1, 2, 3)
SAMPLE_STEPS = 12
SAMPLE_GUIDANCE = 4.0
# Config keys that never change the trained weights (bookkeeping, and sampling, which runs
# on its own generators and a forked global RNG); left out of the checkpoint fingerprint so
# changing them still resumes.
NON_NUMERIC_KEYS = frozenset({"checkpoint_every", "keep_checkpoints", "sample_every", "sample_prompt"})
# Below this many denoiser parameters a CPU run uses one intra-op thread: the kernels are too
# small for OpenMP to pay for its synchronisation, and its spinning threads make a run on a
# busy machine 10-100x slower (embedded model, batch 4, 2 cores: 18-22 steps/s with one
# thread, 15-19 with two on an idle machine, 0.15-0.25 with two beside one busy process).
SMALL_DENOISER_PARAMS = 20_000_000

StepCallback = Callable[[int, float], None]


# --------------------------------------------------------------------------- precision


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """The accelerate `mixed_precision` for `train.mixed_precision` on `device`.

    "auto": "no" on CPU (half-precision CPU kernels are slow and fp32 training of a small
    adapter is cheap); "bf16" on CUDA where supported (no loss scaling needed), else "fp16".
    On MPS, "no": float16 autocast on MPS still lacks kernels and needs a loss scaler that
    PyTorch only recently gained for MPS, while Apple-silicon machines have unified memory
    large enough for fp32 SD-1.5 LoRA training; ask for `fp16` explicitly to halve the
    frozen weights' memory (the LoRA parameters stay float32 either way).
    """
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise ValueError("train.mixed_precision=fp16 needs a GPU; use auto, no or bf16 on CPU")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """dtype of the frozen weights: the half type being trained in, else float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


# --------------------------------------------------------------------------- adapter helpers


def target_modules(cfg: TrainConfig) -> list[str] | str:
    """PEFT `target_modules`: the module names, or with `target_blocks` a regex restricting them
    to those blocks (PEFT full-matches a string against each module path)."""
    if not cfg.target_blocks:
        return list(cfg.target_modules)
    blocks = "|".join(re.escape(b.strip(".")) for b in cfg.target_blocks)
    names = "|".join(re.escape(t) for t in cfg.target_modules)
    return rf"(.*\.)?({blocks})\.(.*\.)?({names})"


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules(cfg),
        init_lora_weights="gaussian",
    )


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters by full module name, detached on the CPU."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`trainable_state` back in; names must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        extra, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise ValueError(f"LoRA state does not match the model: unexpected {extra[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(device=p.device, dtype=p.dtype))


def _rng_state(loop_gen: torch.Generator, noise_gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    # The global RNG drives LoRA dropout; the generators drive batches, noise and timesteps.
    state = {"loop": loop_gen.get_state(), "noise": noise_gen.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(
    state: dict[str, torch.Tensor], loop_gen: torch.Generator, noise_gen: torch.Generator, device: torch.device
) -> None:
    loop_gen.set_state(state["loop"])
    noise_gen.set_state(state["noise"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def cpu_threads_for(model: torch.nn.Module, device: torch.device) -> int | None:
    """1 for a small model on the CPU, unless the user set OMP_NUM_THREADS; else None (leave as is)."""
    import os

    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    n = sum(p.numel() for p in model.parameters())
    return 1 if n < SMALL_DENOISER_PARAMS else None


# --------------------------------------------------------------------------- data helpers


def encode_dataset(
    family, pipe, dataset: CuratedDataset, seed: int, cache: EncodingCache | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, prompt embeddings) of every item, in dataset order.

    The VAE posterior is sampled once per image with a generator seeded from `seed`, so the
    tensors are the same on every run and on resume. With `cache`, each image's posterior
    moments and each caption's embedding are read from disk when their content was seen
    before (see `stunning.training.cache`); the sampled latents are identical either way.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    latents, conds = [], []
    for start in range(0, len(dataset), ENCODE_BATCH):
        items = [dataset[i] for i in range(start, min(start + ENCODE_BATCH, len(dataset)))]
        pixels = torch.stack([it["pixels"] for it in items])
        captions = [it["caption"] for it in items]
        if cache is None:
            latents.append(family.encode_images(pipe, pixels, gen))
            conds.append(family.encode_prompts(pipe, captions))
            continue
        moments = [_cached(cache, "latent", cache.pixels_key(px), lambda px=px: _moments(pipe, px)) for px in pixels]
        mean = torch.stack([m for m, _ in moments]).to(pipe.vae.device)
        std = torch.stack([s for _, s in moments]).to(pipe.vae.device)
        latents.append(family.latents_from_moments(pipe, mean, std, gen))
        conds.append(torch.stack([
            _cached(cache, "prompt", cache.text_key(c, family.name), lambda c=c: family.encode_prompts(pipe, [c])[0])
            for c in captions
        ]).to(pipe.text_encoder.device))
    return torch.cat(latents), torch.cat(conds)


def _moments(pipe, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from stunning.families import image_moments

    mean, std = image_moments(pipe, pixels[None])
    return mean[0].cpu(), std[0].cpu()


def _cached(cache: EncodingCache, kind: str, key: str, compute):
    value = cache.get(kind, key)
    if value is None:
        value = compute()
        value = tuple(v.detach().cpu() for v in value) if isinstance(value, tuple) else value.detach().cpu()
        cache.put(kind, key, value)
    return value


def sample_indices(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Batch indices: distinct within a batch when the set is large enough, else with replacement."""
    if batch_size <= n:
        return torch.randperm(n, generator=generator)[:batch_size]
    return torch.randint(0, n, (batch_size,), generator=generator)


@torch.no_grad()
def evaluate_loss(
    family,
    pipe,
    scheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    seed: int,
    batch_size: int,
    repeats: int = VAL_REPEATS,
) -> float:
    """Mean training objective over a fixed set with fixed noise: comparable across models.

    The same `seed` gives the same noise and timesteps for every model, so the difference
    between two models' values is the difference of the models, not of the draw.
    """
    gen = torch.Generator(device=latents.device).manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(repeats):
        for start in range(0, latents.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            loss = family.training_loss(pipe, latents[sl], cond[sl], gen, scheduler=scheduler)
            n = latents[sl].shape[0]
            total += float(loss) * n
            count += n
    return total / count


# --------------------------------------------------------------------------- training


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

    The summary holds `final_loss` (mean of the last few steps' losses), `val_loss` and
    `base_val_loss` (the same fixed-noise objective on the val split with and without the
    adapter; None without val images), `steps`, `steps_per_s`, `images_per_s` (of the steps
    run in this call; None if none ran), `peak_memory_mb`, `mlflow_run_id`, `seconds`,
    `adapter`, `resumed_from_step`, `fingerprint`, `device`, `mixed_precision`, `loss_history`.
    """
    from stunning.device import PeakMemory, select_device
    from stunning.families import get_family

    t_start = time.perf_counter()
    fam = get_family(family) if isinstance(family, str) else family
    base_path, curated_dir, out_dir = Path(base_path), Path(curated_dir), Path(out_dir)
    dev = select_device(None if device is None else str(device))
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision, dev)
    tracker = tracker or NullTracker()

    train_set = CuratedDataset(curated_dir, style, "train")
    val_set = CuratedDataset(curated_dir, style, "val", allow_empty=True)
    fp = fingerprint(
        cfg.model_dump(exclude=set(NON_NUMERIC_KEYS)),
        base_path,
        style_rows(curated_dir, style),
        curated_dir,
        extra={"family": fam.name, "style": style, "code": _code_identity(fam)},
    )
    store = CheckpointStore.for_run(Path(checkpoint_dir), style, fp, cfg.keep_checkpoints) if checkpoint_dir else None

    run_tags = {"style": style, "stage": "train", "fingerprint": fp, **(tags or {})}
    run_id = tracker.start_run(run_name or f"train-{style}", tags=run_tags)
    status = "FAILED"
    threads_before = torch.get_num_threads()  # _train may lower it for a small model
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
            }
        )
        with PeakMemory(dev) as pm:
            result = _train(
                fam, base_path, train_set, val_set, style, cfg, dev, mixed_precision, store, tracker, on_step, progress,
                Path(cache_dir) if cache_dir is not None else None,
            )
        pipe, history, start_step, loop_s, val_loss, base_val_loss = result
        if dev.type == "cpu":
            tracker.log_params({"cpu_threads": torch.get_num_threads()})
        steps_run = cfg.steps - start_step
        steps_per_s = steps_run / loop_s if steps_run and loop_s > 0 else None
        images_per_s = steps_per_s * cfg.batch_size * cfg.gradient_accumulation if steps_per_s else None

        adapter_dir = out_dir / style
        with atomic_dir(adapter_dir) as tmp:
            fam.save_lora(pipe, tmp, metadata={
                "style": style,
                "training_hash": fp,
                "base_model": str(base_path),
                "family": fam.name,
                "rank": cfg.rank,
                "alpha": cfg.alpha,
                "target_modules": cfg.target_modules,
                "target_blocks": cfg.target_blocks,
                "trigger_words": cfg.trigger_words,
                "steps": cfg.steps,
            })
            dump_resolved(cfg, tmp / "train_config.yaml")
        adapter_file = adapter_dir / "pytorch_lora_weights.safetensors"

        samples = _write_samples(fam, pipe, cfg, style, samples_dir, sample_seeds) if sample_seeds else None
        final_loss = sum(history[-FINAL_LOSS_WINDOW:]) / len(history[-FINAL_LOSS_WINDOW:])
        metrics = {
            "final_loss": final_loss,
            "peak_memory_mb": pm.peak_mb,
            "peak_memory_delta_mb": pm.delta_mb,
            "seconds": time.perf_counter() - t_start,
        }
        if steps_per_s is not None:
            metrics.update(steps_per_s=steps_per_s, images_per_s=images_per_s)
        if val_loss is not None:
            metrics.update(val_loss=val_loss, base_val_loss=base_val_loss)
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
        "val_loss": val_loss,
        "base_val_loss": base_val_loss,
        "steps": cfg.steps,
        "steps_per_s": steps_per_s,
        "images_per_s": images_per_s,
        "peak_memory_mb": pm.peak_mb,
        "mlflow_run_id": run_id,
        "seconds": time.perf_counter() - t_start,
        "adapter": str(adapter_file),
        "resumed_from_step": start_step,
        "fingerprint": fp,
        "device": str(dev),
        "mixed_precision": mixed_precision,
        "n_images": len(train_set),
        "loss_history": history,
    }
    log.info(
        "%s: %d steps, final loss %.4f, val loss %s, %s steps/s, peak %.0f MB",
        style,
        cfg.steps,
        final_loss,
        "n/a" if val_loss is None else f"{val_loss:.4f}",
        "n/a" if steps_per_s is None else f"{steps_per_s:.2f}",
        pm.peak_mb,
    )
    return summary


def _train(
    fam,
    base_path: Path,
    train_set: CuratedDataset,
    val_set: CuratedDataset,
    style: str,
    cfg: TrainConfig,
    dev: torch.device,
    mixed_precision: str,
    store: CheckpointStore | None,
    tracker: Tracker,
    on_step: StepCallback | None,
    progress: bool | None,
    cache_dir: Path | None = None,
):
    """The training proper; returns (pipe, loss history, start step, loop seconds, val, base val)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    pipe = fam.load_pipeline(base_path, dev, weight_dtype(mixed_precision))
    threads = cpu_threads_for(fam.denoiser(pipe), dev)
    if threads is not None:
        log.info("small denoiser on the CPU: using %d intra-op thread(s)", threads)
        torch.set_num_threads(threads)
    for module in fam.frozen_modules(pipe):
        module.requires_grad_(False)
    scheduler = fam.noise_scheduler(pipe)

    cache = EncodingCache(cache_dir, base_path) if cache_dir is not None else None
    latents, cond = encode_dataset(fam, pipe, train_set, cfg.seed, cache)
    val_latents, val_cond = encode_dataset(fam, pipe, val_set, cfg.seed + 1, cache) if len(val_set) else (None, None)
    if cache is not None:
        log.info("%s: encoding cache %s: %d hits, %d misses", style, cache.root, cache.hits, cache.misses)
        tracker.log_metrics({"cache_hits": cache.hits, "cache_misses": cache.misses}, step=0)

    # The empty prompt's conditioning, for caption dropout (and so for guidance-free style).
    empty_cond = fam.encode_prompts(pipe, [""]) if cfg.caption_dropout else None

    denoiser = fam.denoiser(pipe)
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    # The adapter's gaussian init draws from the global RNG: seed it so runs are repeatable.
    torch.manual_seed(cfg.seed)
    denoiser.add_adapter(lora_config(cfg))
    # Trainable parameters stay float32 even when the frozen weights are half precision.
    cast_training_params(denoiser, dtype=torch.float32)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    from diffusers.optimization import get_scheduler

    lr_schedule = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps
    )
    ema = None
    if cfg.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay)

    loop_gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    noise_gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    history: list[float] = []
    start_step = 0
    ckpt = store.latest() if store else None
    if ckpt is not None:
        load_trainable_state(denoiser, ckpt.lora)
        optimizer.load_state_dict(ckpt.optimizer["optimizer"])
        if "lr_scheduler" in ckpt.optimizer:
            lr_schedule.load_state_dict(ckpt.optimizer["lr_scheduler"])
        if ema is not None and "ema" in ckpt.optimizer:
            ema.load_state_dict(ckpt.optimizer["ema"])
        _set_rng_state(ckpt.rng, loop_gen, noise_gen, dev)
        history = list(ckpt.loss_history)
        start_step = min(ckpt.step, cfg.steps)
        log.info("%s: resuming from %s (step %d of %d)", style, ckpt.path, ckpt.step, cfg.steps)
        for i, loss in enumerate(history, start=1):
            tracker.log_metrics({"loss": loss}, step=i)

    # The shared accelerate state would refuse a second Accelerator with another precision
    # in the same process (two runs in one test session or flow); each run sets its own.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        cpu=dev.type == "cpu",
        device_placement=False,  # everything is already on `dev`, which may be e.g. cuda:1
    )
    if ckpt is not None and accelerator.scaler is not None and ckpt.optimizer.get("scaler"):
        accelerator.scaler.load_state_dict(ckpt.optimizer["scaler"])
    optimizer = accelerator.prepare(optimizer)

    denoiser.train()
    pending: list[tuple[int, float]] = []
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        desc=f"train {style}",
        unit="step",
        disable=None if progress is None else not progress,
    )
    t0 = time.perf_counter()
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            micro = []
            for _ in range(cfg.gradient_accumulation):
                idx = sample_indices(latents.shape[0], cfg.batch_size, loop_gen).to(latents.device)
                batch_cond = cond[idx]
                if empty_cond is not None:
                    drop = torch.rand(len(idx), generator=loop_gen) < cfg.caption_dropout
                    batch_cond = torch.where(drop.to(cond.device)[:, None, None], empty_cond.expand_as(batch_cond), batch_cond)
                with accelerator.accumulate(denoiser):
                    with accelerator.autocast():
                        loss = fam.training_loss(pipe, latents[idx], batch_cond, noise_gen, scheduler=scheduler)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    lr_schedule.step()
                    if ema is not None:
                        ema.step(params)
                micro.append(loss.detach().float().item())
            step_loss = sum(micro) / len(micro)
            history.append(step_loss)
            pending.append((step, step_loss))
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                t_sample = time.perf_counter()
                _log_intermediate_samples(fam, pipe, cfg, style, step, dev, tracker)
                t0 += time.perf_counter() - t_sample  # sampling is not training throughput
            if store is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                opt_state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_schedule.state_dict()}
                if ema is not None:
                    opt_state["ema"] = ema.state_dict()
                if accelerator.scaler is not None:
                    opt_state["scaler"] = accelerator.scaler.state_dict()
                store.save(step, trainable_state(denoiser), opt_state, _rng_state(loop_gen, noise_gen, dev), history)
                # Metrics are flushed with each checkpoint: per-step database writes would
                # slow the loop, and a crashed run still shows its curve up to here.
                _flush(tracker, pending)
            if on_step is not None:
                on_step(step, step_loss)
    finally:
        bar.close()
        _flush(tracker, pending)
    loop_s = time.perf_counter() - t0
    if ema is not None:
        ema.copy_to(params)  # the averaged adapter is the one evaluated and saved

    denoiser.eval()
    val_loss = base_val_loss = None
    if val_latents is not None:
        val_loss = evaluate_loss(fam, pipe, scheduler, val_latents, val_cond, cfg.seed + 2, cfg.batch_size)
        denoiser.disable_adapters()
        try:
            base_val_loss = evaluate_loss(fam, pipe, scheduler, val_latents, val_cond, cfg.seed + 2, cfg.batch_size)
        finally:
            denoiser.enable_adapters()
    accelerator.free_memory()
    return pipe, history, start_step, loop_s, val_loss, base_val_loss


def _flush(tracker: Tracker, pending: list[tuple[int, float]]) -> None:
    for step, loss in pending:
        tracker.log_metrics({"loss": loss}, step=step)
    pending.clear()


def _log_intermediate_samples(fam, pipe, cfg: TrainConfig, style: str, step: int, dev, tracker: Tracker) -> None:
    """Samples at `step` to the tracker (`samples/step-<n>/`), without disturbing training.

    Generation uses its own seeded generators; the global RNG (LoRA dropout) is forked so
    that a run with samples trains exactly like one without.
    """
    denoiser = fam.denoiser(pipe)
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), tempfile.TemporaryDirectory(prefix=f"samples-{style}-") as tmp:
        denoiser.eval()
        try:
            folder = _write_samples(fam, pipe, cfg, style, tmp, SAMPLE_SEEDS)
        finally:
            denoiser.train()
        tracker.log_artifact(folder, f"samples/step-{step}")


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


def sample_prompt(cfg: TrainConfig, style: str) -> str:
    """The sample prompt in the captions' convention (`..., <style> style`)."""
    return f"{cfg.sample_prompt}, {style} style"


def _write_samples(
    fam, pipe, cfg: TrainConfig, style: str, samples_dir: str | Path | None, seeds: Sequence[int]
) -> Path:
    """Generate the final sample images into `samples_dir/<style>/` (or a temp folder)."""
    prompt = sample_prompt(cfg, style)
    images = fam.generate(pipe, [prompt] * len(seeds), [int(s) for s in seeds], SAMPLE_STEPS, SAMPLE_GUIDANCE)
    target = (
        Path(samples_dir) / style if samples_dir is not None else Path(tempfile.mkdtemp(prefix=f"samples-{style}-"))
    )
    ctx = atomic_dir(target) if samples_dir is not None else contextlib.nullcontext(target)
    with ctx as folder:
        for seed, img in zip(seeds, images, strict=True):
            img.save(Path(folder) / f"seed-{seed}.png")
        (Path(folder) / "prompt.txt").write_text(prompt + "\n")
    return target
