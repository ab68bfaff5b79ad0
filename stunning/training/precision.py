"""Numeric setup of a run: mixed precision per device, the autocast it enters, and on the CPU
the intra-op thread count (a rule for small models, then a timed calibration).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

from stunning.training.memory import free_memory, is_oom_error
from stunning.training.rng import global_rng_state, load_trainable_state, set_global_rng_state, trainable_state

log = logging.getLogger(__name__)

# Below this many denoiser parameters a CPU run uses one intra-op thread: the kernels are too
# small for OpenMP to pay for its synchronisation, and its spinning threads make a run on a
# busy machine 10-100x slower (embedded model, batch 4, 2 cores: 18-22 steps/s with one
# thread, 15-19 with two on an idle machine, 0.15-0.25 with two beside one busy process).
SMALL_DENOISER_PARAMS = 20_000_000
# CPU calibration (train.mixed_precision auto): a step shorter than this is bound by
# per-operator overhead, where neither more threads nor bf16 pay (measured: the 32-px micro
# model trains at 12.2 steps/s in fp32 and 9.3 in bf16 autocast, one thread); longer steps
# are compute-bound (a 64-px SD-1.5-layout UNet: 0.66 steps/s on one thread, 1.0 on two,
# 1.68 in bf16 autocast on an AVX512-BF16 CPU).
CPU_BOUND_STEP_S = 0.15
CALIBRATION_STEPS = 2
MIN_SPEEDUP = 1.15  # switch only for a clear gain: timings on a shared machine are noisy


def resolve_mixed_precision(requested: str, device: torch.device, mps_choice: str | None = None) -> str:
    """The accelerate `mixed_precision` for `train.mixed_precision` on `device`.

    "auto":
    - CPU: "no" (fp32); the trainer then times a few steps (:func:`calibrate_cpu`) to
      choose the thread count. bf16 autocast only when asked for (`bf16`);
    - CUDA: "bf16" where supported (Ampere and newer; no loss scaling needed), else "fp16";
    - MPS: the choice of :func:`stunning.device.mps_half_precision` (what the Mac trainers
      use): "bf16" on M2-or-newer with macOS 14+ and torch 2.6+, else "fp16" with a gradient
      scaler. `mps_choice` overrides the probe (tests).
    The frozen weights are loaded in that half type and the LoRA parameters stay float32; a
    VAE that overflows in fp16 (config `force_upcast`, e.g. SDXL's) stays float32 (the family
    loads it so). `PYTORCH_ENABLE_MPS_FALLBACK` is set by `import stunning` on macOS, so an
    operator Metal lacks runs on the CPU instead of stopping the run.
    """
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise ValueError("train.mixed_precision=fp16 needs a GPU; use auto, no or bf16 on CPU")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        if mps_choice is None:
            from stunning.device import mps_half_precision

            mps_choice, why = mps_half_precision()
            log.info("MPS precision %s: %s", mps_choice, why)
        return mps_choice
    return "no"


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """dtype of the frozen weights: the half type being trained in, else float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def autocast(dev: torch.device, mixed_precision: str):
    """The autocast context of `mixed_precision` on `dev` (what accelerate's `autocast` enters)."""
    if mixed_precision in ("fp16", "bf16"):
        return torch.autocast(device_type=dev.type, dtype=weight_dtype(mixed_precision))
    return contextlib.nullcontext()


def cpu_threads_for(model: torch.nn.Module, device: torch.device) -> int | None:
    """1 for a small model on the CPU, unless the user set OMP_NUM_THREADS; else None (leave as is)."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    n = sum(p.numel() for p in model.parameters())
    return 1 if n < SMALL_DENOISER_PARAMS else None


def calibrate_cpu(
    fam, pipe, params, scheduler, latents, cond, batch, cfg, dev, more_threads: int | None, mixed_precision: str = "no",
):
    """(threads, mixed_precision) for a CPU run with `train.mixed_precision: auto`.

    Times a few trial steps (leaving no trace, like the batch probe) at the current thread
    count; if a step is compute-bound (>= CPU_BOUND_STEP_S) and the small-model rule chose
    fewer threads than the default (`more_threads`), also with the default, which must be
    MIN_SPEEDUP faster to be chosen. Precision stays fp32 ("no"): bf16 autocast on a CPU
    with native bf16 (AVX512-BF16/AMX) measured up to 1.5x faster on compute-bound steps,
    but it changes the numerics, so it is only used when `train.mixed_precision: bf16` asks
    (or a bf16 base, `train.base_precision: bf16`, needs it: `mixed_precision` is then "bf16"
    and is timed and kept).
    """
    threads = torch.get_num_threads()
    try:
        timing = {threads: _time_steps(fam, pipe, params, scheduler, latents, cond, batch, cfg, dev, mixed_precision)}
    except Exception as exc:
        if not is_oom_error(exc):
            raise
        free_memory(dev)  # the loop's own out-of-memory handling takes it from here
        log.info("CPU calibration skipped: a trial step ran out of memory")
        return threads, mixed_precision
    if timing[threads] >= CPU_BOUND_STEP_S and more_threads and more_threads > threads:
        torch.set_num_threads(more_threads)
        timing[more_threads] = _time_steps(fam, pipe, params, scheduler, latents, cond, batch, cfg, dev, mixed_precision)
        if timing[threads] / timing[more_threads] >= MIN_SPEEDUP:
            threads = more_threads
        torch.set_num_threads(threads)
    log.info("CPU calibration: %s", ", ".join(f"{n} thread(s): {t:.3f} s/step" for n, t in timing.items()))
    log.info("CPU training with %d thread(s), %s", threads, "fp32" if mixed_precision == "no" else mixed_precision)
    return threads, mixed_precision


def _time_steps(fam, pipe, params, scheduler, latents, cond, batch, cfg, dev, mixed_precision) -> float:
    """Seconds per training step (forward, backward, AdamW step) after one warm-up; no trace left."""
    denoiser = fam.denoiser(pipe)
    snapshot, rng, was_training = trainable_state(denoiser), global_rng_state(dev), denoiser.training
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
    idx = torch.arange(batch) % latents.shape[0]
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    denoiser.train()
    times = []
    try:
        for _ in range(1 + CALIBRATION_STEPS):
            t0 = time.perf_counter()
            with autocast(dev, mixed_precision):
                loss = fam.training_loss(pipe, latents[idx], cond[idx], gen, scheduler=scheduler)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    finally:
        opt.state.clear()
        load_trainable_state(denoiser, snapshot)
        set_global_rng_state(rng, dev)
        denoiser.train(was_training)
    return sum(times[1:]) / CALIBRATION_STEPS
