"""The training loop of one LoRA adapter: from a base model and a curated set to trained weights.

:func:`run_training` goes through named steps, one function each:

1. :func:`load_model` — the pipeline through its family, frozen, on the device, its denoiser
   quantized to int8/int4 when `train.base_precision` asks (QLoRA, :mod:`stunning.training.quantized`);
2. :func:`encode_data` — latents and prompt embeddings per bucket, the val set, DreamBooth's
   class images, the empty prompt of caption dropout;
3. :func:`add_adapter` — the seeded LoRA adapter and its trainable parameters;
4. :func:`choose_batch_size` and :func:`choose_cpu_setup` — the checkpoint's, else the
   config's or probed batch size; on a CPU with precision auto, the thread count measured;
5. :func:`build_optimization`, :func:`restore`, :func:`prepare_accelerator` — optimizer, LR
   schedule, EMA and the loop's generators, a checkpoint's state put back into them;
6. :func:`train_loop` over :func:`train_step` — the steps, with out-of-memory backoff,
   thermal pauses, intermediate samples and checkpoints;
7. :func:`evaluate` — the (EMA) adapter's val loss, and the base model's.

All randomness goes through explicit generators seeded from `train.seed` (batch indices on a
CPU generator, noise and timesteps on a generator of the compute device) whose states are
checkpointed with the weights, so a resumed run continues exactly where the interrupted one
stopped. A step that runs out of memory is rewound and redone with half the batch; the batch
size in use is checkpointed, so a resumed run continues with it (never re-probed). A step whose
loss or gradients are not finite is never applied: the run rolls back to its last good state
and goes on at half the learning rate (:mod:`stunning.training.divergence`).

With aspect-ratio buckets every batch is drawn from one bucket, chosen with probability
proportional to its image count on the loop generator. With DreamBooth prior preservation
each step adds the same objective on as many class images, weighted by
`train.prior_loss_weight` (Ruiz et al. 2023, eq. 2).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stunning.config import TrainConfig
from stunning.tracking import Tracker
from stunning.training.adapter import lora_config
from stunning.training.batch import BatchSizeError, probe_batch_size
from stunning.training.cache import EncodingCache
from stunning.training.checkpoint import Checkpoint, CheckpointStore
from stunning.training.dataset import CuratedDataset, curated_data_config
from stunning.training.divergence import NonFiniteStep, TrainingDiverged, advice, cpu_copy, set_learning_rate, snapshot
from stunning.training.dreambooth import class_image_size, class_set, instance_caption_fn
from stunning.training.encoding import check_bucket_sizes, encode_buckets
from stunning.training.evaluation import evaluate_buckets
from stunning.training.memory import free_memory, is_oom_error
from stunning.training.precision import calibrate_cpu, cpu_threads_for
from stunning.training.quantized import BasePrecision, quantize_frozen_denoiser
from stunning.training.rng import load_trainable_state, rng_state, set_rng_state, trainable_state
from stunning.training.samples import log_intermediate_samples
from stunning.training.thermal import ThermalGuard, ThermalProbe, describe

log = logging.getLogger(__name__)

# Gradient-norm clipping as in diffusers' LoRA example scripts; keeps a high learning rate
# from blowing up the adapter on the first steps.
MAX_GRAD_NORM = 1.0

StepCallback = Callable[[int, float], None]
Encoded = tuple[torch.Tensor, torch.Tensor]  # (latents, conditioning) of a set of images


@dataclass
class TrainJob:
    """What to train: one style's data and config on a device, and where the run reports."""

    fam: Any
    base_path: Path
    train_set: CuratedDataset
    val_set: CuratedDataset
    style: str
    cfg: TrainConfig
    dev: torch.device
    base: BasePrecision  # the frozen base's precision and the run's mixed precision (train.base_precision resolved)
    store: CheckpointStore | None
    tracker: Tracker
    on_step: StepCallback | None = None  # called after every optimizer step
    progress: bool | None = None  # the progress bar: None shows it only on a terminal
    cache_dir: Path | None = None  # the on-disk encoding cache (None: encode in memory)
    thermal_probe: ThermalProbe | None = None
    class_dir: Path | None = None  # where DreamBooth's class images are kept

    @property
    def mixed_precision(self) -> str:
        return self.base.mixed_precision


@dataclass
class LoopResult:
    """What a finished loop hands back to the trainer."""

    pipe: Any  # with the trained adapter in its denoiser
    history: list[float]  # loss of every step, including those before a resume
    start_step: int  # the step this call resumed from (0: a fresh run)
    loop_seconds: float  # training time of this call, without sampling or thermal pauses
    val_loss: float | None  # None without val images
    base_val_loss: float | None
    batch_size: int  # in use at the end: `auto` resolved, after any halving
    batch_backoffs: int  # steps redone with half the batch after running out of memory
    images: int  # images trained on in this call
    thermal: dict[str, float]  # the thermal guard's counters
    buckets: int
    mixed_precision: str  # on a CPU with auto: what calibration chose
    divergence_retries: int = 0  # rollbacks to the last good state after a non-finite step (whole run)
    learning_rate: float | None = None  # the base learning rate at the end (lowered by each retry)


@dataclass
class Model:
    """The loaded pipeline with the parts the loop uses."""

    pipe: Any
    denoiser: torch.nn.Module
    scheduler: Any  # the family's training noise scheduler
    default_threads: int  # torch's thread count before the small-model rule
    small_model_threads: int | None  # what the small-model rule set (None: left as it was)
    params: list[torch.nn.Parameter] = field(default_factory=list)  # the adapter's, once added


@dataclass
class Data:
    """The encoded training data."""

    buckets: list[Encoded]  # one per aspect-ratio bucket (one for a single-size set)
    counts: torch.Tensor  # images per bucket: the weights of the bucket draw
    largest: int  # the biggest bucket (most pixels, then most images): probe and calibration use it
    val_buckets: list[Encoded] | None  # None without val images
    class_latents: torch.Tensor | None = None  # DreamBooth prior preservation's class images
    class_cond: torch.Tensor | None = None
    empty_cond: torch.Tensor | None = None  # the empty prompt's conditioning, for caption dropout


@dataclass
class Optimization:
    """Optimizer, LR schedule, EMA, the loop's generators and (once prepared) the accelerator."""

    optimizer: Any
    lr_schedule: Any
    ema: Any | None
    loop_gen: torch.Generator  # buckets, batch indices, caption dropout (CPU)
    noise_gen: torch.Generator  # noise and timesteps (the compute device)
    accelerator: Any = None


@dataclass
class Progress:
    """The loop's running state; the batch size shrinks when a step runs out of memory."""

    batch: int
    start_step: int = 0
    history: list[float] = field(default_factory=list)
    backoffs: int = 0
    images: int = 0
    retries: int = 0  # divergence rollbacks so far (a resumed run continues the count of its checkpoint)
    rolled_back_to: int | None = None  # the step of the last rollback's target


def run_training(job: TrainJob) -> LoopResult:
    """The training proper, step by step (see the module docstring)."""
    model = load_model(job)
    data = encode_data(job, model)
    add_adapter(job.cfg, model)
    ckpt = job.store.latest() if job.store else None
    batch = choose_batch_size(job, model, data, ckpt)
    mixed_precision = choose_cpu_setup(job, model, data, batch, ckpt)
    opt = build_optimization(job.cfg, model.params, job.dev)
    start_step, history = restore(job, model, opt, ckpt)
    job.tracker.log_metrics({"batch_size": batch}, step=start_step)
    prepare_accelerator(job, opt, mixed_precision, ckpt)
    progress = Progress(batch, start_step, history, retries=int(ckpt.meta.get("divergence_retries", 0)) if ckpt else 0)
    loop_seconds, guard = train_loop(job, model, data, opt, progress, mixed_precision)
    val_loss, base_val_loss = evaluate(job, model, data, opt, progress.batch)
    opt.accelerator.free_memory()
    return LoopResult(
        pipe=model.pipe,
        history=progress.history,
        start_step=start_step,
        loop_seconds=loop_seconds,
        val_loss=val_loss,
        base_val_loss=base_val_loss,
        batch_size=progress.batch,
        batch_backoffs=progress.backoffs,
        images=progress.images,
        thermal=guard.metrics(),
        buckets=len(data.buckets),
        mixed_precision=mixed_precision,
        divergence_retries=progress.retries,
        learning_rate=float(opt.lr_schedule.base_lrs[0]),
    )


def load_model(job: TrainJob) -> Model:
    """The base pipeline on the device in the run's weight dtype, frozen; with an int8/int4
    base its denoiser quantized (on the CPU before a GPU sees it, so device memory never holds
    the float weights); a small denoiser on the CPU gets one intra-op thread
    (:func:`~stunning.training.precision.cpu_threads_for`)."""
    from stunning.device import vae_needs_fp32

    fam, dev, base = job.fam, job.dev, job.base
    load_dev = torch.device("cpu") if base.quantized and dev.type != "cpu" else dev
    pipe = fam.load_pipeline(job.base_path, load_dev, base.load_dtype)
    if base.quantized:
        stats = quantize_frozen_denoiser(fam.denoiser(pipe), base.precision)
        job.tracker.log_params({"base_quantized_modules": stats["quantized_modules"],
                                "base_denoiser_mb": round(stats["bytes_after"] / 2**20, 3)})
        if load_dev != dev:
            pipe = pipe.to(dev)
    if vae_needs_fp32(pipe.vae, pipe.vae.dtype):
        pipe.vae.to(torch.float32)  # fp16 overflows in this VAE (its config says force_upcast)
    default_threads = torch.get_num_threads()
    threads = cpu_threads_for(fam.denoiser(pipe), dev)
    if threads is not None:
        log.info("small denoiser on the CPU: using %d intra-op thread(s)", threads)
        torch.set_num_threads(threads)
    for module in fam.frozen_modules(pipe):
        module.requires_grad_(False)
    return Model(pipe, fam.denoiser(pipe), fam.noise_scheduler(pipe), default_threads, threads)


def encode_data(job: TrainJob, model: Model) -> Data:
    """Check the image sizes, then encode the train and val sets (per bucket), DreamBooth's class
    images and the empty prompt, each once; logs the bucket histogram and cache counts."""
    fam, pipe, cfg, tracker, style = job.fam, model.pipe, job.cfg, job.tracker, job.style
    train_set, val_set = job.train_set, job.val_set
    all_sizes = set(train_set.sizes) | set(val_set.sizes)
    if len(all_sizes) > 1 or curated_data_config(train_set.root).get("buckets"):
        check_bucket_sizes(fam, pipe, all_sizes, str(train_set.root / "manifest.csv"))
    cache = EncodingCache(job.cache_dir, job.base_path) if job.cache_dir is not None else None
    captions = instance_caption_fn(cfg)
    buckets = encode_buckets(fam, pipe, train_set, cfg.seed, cache, captions)
    val_buckets = encode_buckets(fam, pipe, val_set, cfg.seed + 1, cache, captions) if len(val_set) else None
    sizes = list(train_set.buckets())
    counts = torch.tensor([float(lat.shape[0]) for lat, _ in buckets])
    largest = max(range(len(buckets)), key=lambda i: (sizes[i][0] * sizes[i][1], counts[i]))
    data = Data(buckets, counts, largest, val_buckets)
    class_size = class_image_size(train_set, sizes, largest) if cfg.prior_preservation else None
    if class_size is not None:
        check_bucket_sizes(fam, pipe, [class_size], "train.prior_preservation class images")
    if len(buckets) > 1:
        histogram = {f"{w}x{h}": int(n) for (w, h), n in zip(sizes, counts, strict=True)}
        log.info("%s: %d aspect-ratio buckets: %s", style, len(buckets),
                 ", ".join(f"{size}: {n}" for size, n in histogram.items()))
        tracker.log_params({"buckets": histogram})
    if class_size is not None:
        data.class_latents, data.class_cond = class_set(fam, pipe, job.base_path, cfg, class_size, job.class_dir, cache)
        log.info("%s: prior preservation with %d class images (%r)", style, data.class_latents.shape[0],
                 cfg.class_prompt)
    if cache is not None:
        log.info("%s: encoding cache %s: %d hits, %d misses", style, cache.root, cache.hits, cache.misses)
        tracker.log_metrics({"cache_hits": cache.hits, "cache_misses": cache.misses}, step=0)
    # The empty prompt's conditioning, for caption dropout (and so for guidance-free style).
    data.empty_cond = fam.encode_prompts(pipe, [""]) if cfg.caption_dropout else None
    return data


def add_adapter(cfg: TrainConfig, model: Model) -> None:
    """Add the LoRA adapter to the denoiser (seeded init, float32 parameters) into `model.params`."""
    from diffusers.training_utils import cast_training_params

    denoiser = model.denoiser
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    # The adapter's gaussian init draws from the global RNG: seed it so runs are repeatable.
    torch.manual_seed(cfg.seed)
    denoiser.add_adapter(lora_config(cfg))
    # Trainable parameters stay float32 even when the frozen weights are half precision.
    cast_training_params(denoiser, dtype=torch.float32)
    model.params = [p for p in denoiser.parameters() if p.requires_grad]


def choose_batch_size(job: TrainJob, model: Model, data: Data, ckpt: Checkpoint | None) -> int:
    """The checkpoint's batch size (a resumed run continues with the one it used, never
    re-probed), else the config's, else probed (:func:`~stunning.training.batch.probe_batch_size`).

    Probing happens before the optimizer and the loop's generators exist, and restores what
    it touches, so the run trains exactly as if the chosen size had been in the config.
    """
    cfg = job.cfg
    if ckpt is not None and "batch_size" in ckpt.meta:
        batch, source = int(ckpt.meta["batch_size"]), "checkpoint"
    elif cfg.batch_size == "auto":
        latents, cond = data.buckets[data.largest]
        class_latents, class_cond = data.class_latents, data.class_cond
        if class_latents is not None:  # each step trains on as many class images as instance images
            if class_latents.shape[1:] == latents.shape[1:]:
                latents, cond = torch.cat([latents, class_latents]), torch.cat([cond, class_cond])
            elif class_latents[0].numel() > latents[0].numel():
                latents, cond = class_latents, class_cond  # trials of the bigger size bound both
        batch = probe_batch_size(job.fam, model.pipe, model.params, model.scheduler, latents, cond, cfg, job.dev,
                                 job.mixed_precision, per_step=2 if class_latents is not None else 1)
        source = "probe"
    else:
        batch, source = int(cfg.batch_size), "config"
    log.info("%s: batch size %d (%s)", job.style, batch, source)
    job.tracker.log_params({"batch_size": batch, "batch_size_source": source})
    return batch


def choose_cpu_setup(job: TrainJob, model: Model, data: Data, batch: int, ckpt: Checkpoint | None) -> str:
    """The run's mixed precision. On a CPU with `mixed_precision: auto` the thread count (and
    precision) are measured (:func:`~stunning.training.precision.calibrate_cpu`), not
    guessed; a resumed run keeps the checkpoint's."""
    if job.dev.type != "cpu" or job.cfg.mixed_precision != "auto":
        return job.mixed_precision
    if ckpt is not None and "cpu_setup" in ckpt.meta:
        cpu_threads, mixed_precision = ckpt.meta["cpu_setup"]
    else:
        latents, cond = data.buckets[data.largest]
        cpu_threads, mixed_precision = calibrate_cpu(
            job.fam, model.pipe, model.params, model.scheduler, latents, cond, batch, job.cfg, job.dev,
            model.default_threads if model.small_model_threads is not None else None,
            mixed_precision=job.mixed_precision,
        )
    torch.set_num_threads(int(cpu_threads))
    job.tracker.log_params({"cpu_threads_chosen": int(cpu_threads), "mixed_precision_chosen": mixed_precision})
    return mixed_precision


def build_optimization(cfg: TrainConfig, params: list[torch.nn.Parameter], dev: torch.device) -> Optimization:
    """AdamW, the LR schedule, the EMA of the adapter (with `train.ema_decay`) and the loop's
    generators, all freshly seeded."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    lr_schedule = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps
    )
    ema = None
    if cfg.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay)
    loop_gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    noise_gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    return Optimization(optimizer, lr_schedule, ema, loop_gen, noise_gen)


def restore(job: TrainJob, model: Model, opt: Optimization, ckpt: Checkpoint | None) -> tuple[int, list[float]]:
    """Put a checkpoint's state back (adapter, optimizer, schedule, EMA, RNG states) and replay
    its losses to the tracker; (the step to continue from, the loss history so far)."""
    if ckpt is None:
        return 0, []
    load_trainable_state(model.denoiser, ckpt.lora)
    opt.optimizer.load_state_dict(ckpt.optimizer["optimizer"])
    if "lr_scheduler" in ckpt.optimizer:
        opt.lr_schedule.load_state_dict(ckpt.optimizer["lr_scheduler"])
    if opt.ema is not None and "ema" in ckpt.optimizer:
        opt.ema.load_state_dict(ckpt.optimizer["ema"])
    set_rng_state(ckpt.rng, opt.loop_gen, opt.noise_gen, job.dev)
    history = list(ckpt.loss_history)
    start_step = min(ckpt.step, job.cfg.steps)
    log.info("%s: resuming from %s (step %d of %d)", job.style, ckpt.path, ckpt.step, job.cfg.steps)
    job.tracker.log_metric_steps([(i, {"loss": loss}) for i, loss in enumerate(history, start=1)])
    return start_step, history


def prepare_accelerator(job: TrainJob, opt: Optimization, mixed_precision: str, ckpt: Checkpoint | None) -> None:
    """An accelerate `Accelerator` in the run's precision (its gradient scaler restored), wrapping the optimizer."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # The shared accelerate state would refuse a second Accelerator with another precision
    # in the same process (two runs in one test session or flow); each run sets its own.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=job.cfg.gradient_accumulation,
        cpu=job.dev.type == "cpu",
        device_placement=False,  # everything is already on `dev`, which may be e.g. cuda:1
    )
    if ckpt is not None and accelerator.scaler is not None and ckpt.optimizer.get("scaler"):
        accelerator.scaler.load_state_dict(ckpt.optimizer["scaler"])
    opt.optimizer = accelerator.prepare(opt.optimizer)
    opt.accelerator = accelerator


def sample_indices(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Batch indices: distinct within a batch when the set is large enough, else with replacement."""
    if batch_size <= n:
        return torch.randperm(n, generator=generator)[:batch_size]
    return torch.randint(0, n, (batch_size,), generator=generator)


def train_step(
    job: TrainJob, model: Model, data: Data, opt: Optimization, batch_size: int, updated: list[bool]
) -> tuple[list[float], list[tuple[float, float]]]:
    """One optimizer step (all its micro-batches): the micro-batch losses and, with prior
    preservation, each micro-batch's (instance loss, prior loss).

    `updated[0]` turns True once the optimizer has stepped: from then on the step cannot be redone.
    """
    cfg, fam, pipe, accelerator = job.cfg, job.fam, model.pipe, opt.accelerator
    buckets, class_latents, class_cond = data.buckets, data.class_latents, data.class_cond
    micro: list[float] = []
    parts: list[tuple[float, float]] = []
    for _ in range(cfg.gradient_accumulation):
        # One bucket per batch, drawn in proportion to its images (no draw with one bucket,
        # so single-size runs use the generator exactly as before buckets existed).
        b = int(torch.multinomial(data.counts, 1, generator=opt.loop_gen)) if len(buckets) > 1 else 0
        latents, cond = buckets[b]
        idx = sample_indices(latents.shape[0], batch_size, opt.loop_gen).to(latents.device)
        batch_cond = cond[idx]
        if data.empty_cond is not None:
            drop = torch.rand(len(idx), generator=opt.loop_gen) < cfg.caption_dropout
            batch_cond = torch.where(
                drop.to(cond.device)[:, None, None], data.empty_cond.expand_as(batch_cond), batch_cond
            )
        class_idx = None
        if class_latents is not None:
            class_idx = sample_indices(class_latents.shape[0], batch_size, opt.loop_gen).to(class_latents.device)
        with accelerator.accumulate(model.denoiser):
            with accelerator.autocast():
                loss = fam.training_loss(pipe, latents[idx], batch_cond, opt.noise_gen, scheduler=model.scheduler)
                if class_idx is not None:
                    # DreamBooth's prior-preservation loss (Ruiz et al. 2023, eq. 2): the same
                    # objective on base-model images of the class, weighted, added to the
                    # instance loss (noise drawn after the instance batch's).
                    prior = fam.training_loss(pipe, class_latents[class_idx], class_cond[class_idx], opt.noise_gen,
                                              scheduler=model.scheduler)
                    parts.append((loss.detach().float().item(), prior.detach().float().item()))
                    loss = loss + cfg.prior_loss_weight * prior
            loss_value = loss.detach().float().item()
            if not math.isfinite(loss_value):
                raise NonFiniteStep("loss", loss_value)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.params, MAX_GRAD_NORM)
                # With an fp16 loss scaler an infinite gradient is the scaler's to handle (it
                # skips the step and lowers the scale); without one it is divergence.
                if grad_norm is not None and accelerator.scaler is None and not bool(torch.isfinite(grad_norm)):
                    raise NonFiniteStep("gradient norm", float(grad_norm))
            opt.optimizer.step()
            if accelerator.sync_gradients:
                updated[0] = True  # from here on the step cannot be redone
            opt.optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            opt.lr_schedule.step()
            if opt.ema is not None:
                opt.ema.step(model.params)
        micro.append(loss_value)
    return micro, parts


def step_with_backoff(
    job: TrainJob, model: Model, data: Data, opt: Optimization, progress: Progress, step: int
) -> tuple[list[float], list[tuple[float, float]]]:
    """:func:`train_step`; when it runs out of memory before the optimizer stepped, rewind it
    (gradients, generators, dropout RNG, accumulation counter), halve `progress.batch` and redo it."""
    while True:
        # What a step redone after running out of memory must start from again.
        rng_before, accumulated_before = rng_state(opt.loop_gen, opt.noise_gen, job.dev), opt.accelerator.step
        updated = [False]
        try:
            return train_step(job, model, data, opt, progress.batch, updated)
        except Exception as exc:
            if not is_oom_error(exc) or updated[0]:
                raise
            failure = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # Out of the except block: the failed attempt's frames and tensors are released.
        for p in model.params:
            p.grad = None
        set_rng_state(rng_before, opt.loop_gen, opt.noise_gen, job.dev)
        opt.accelerator.step = accumulated_before
        free_memory(job.dev)
        if progress.batch == 1:
            raise BatchSizeError(
                f"{job.style}: step {step} runs out of memory on {job.dev} even with a batch of 1 image ({failure}). "
                "Lower data.resolution or train.rank, set train.gradient_checkpointing: true, or use "
                "train.mixed_precision fp16/bf16 on a GPU."
            )
        progress.batch //= 2
        progress.backoffs += 1
        log.warning("%s: step %d ran out of memory (%s); redoing it with batch size %d",
                    job.style, step, failure, progress.batch)


def train_loop(
    job: TrainJob, model: Model, data: Data, opt: Optimization, progress: Progress, mixed_precision: str
) -> tuple[float, ThermalGuard]:
    """Steps `progress.start_step + 1 .. train.steps`; (seconds of training, the thermal guard).

    Per step: the step (with out-of-memory backoff), its metrics (flushed to the tracker with
    each checkpoint), a thermal check that may pause, intermediate samples every
    `train.sample_every` steps, a checkpoint every `train.checkpoint_every` steps and at the
    end, then `job.on_step` (an exception there stops the run; the newest checkpoint survives).
    Pauses for heat and sampling are not counted as training time.

    A step with a non-finite loss or gradient norm (and a checkpoint interval reached with
    non-finite adapter weights) rolls the run back to the last good state at half the
    learning rate (:func:`roll_back`); the steps after that state are redone.
    """
    from tqdm.auto import tqdm

    cfg = job.cfg
    guard = ThermalGuard(
        job.thermal_probe,
        check_every=cfg.thermal_check_every,
        pause_s=cfg.thermal_pause_s,
        max_pause_s=cfg.thermal_max_pause_s,
    )
    model.denoiser.train()
    pending: list[tuple[int, dict[str, float]]] = []
    bar = tqdm(
        total=cfg.steps,
        initial=progress.start_step,
        desc=f"train {job.style}",
        unit="step",
        disable=None if job.progress is None else not job.progress,
    )
    # The last good state in memory: the start of this run (small: where a state that diverges
    # again after a rollback goes back to), and without checkpointing the newest checkpoint
    # interval; with checkpointing the checkpoints themselves are the newest good states.
    origin = good = _snapshot(job, model, opt, progress, progress.start_step, mixed_precision)
    t0 = time.perf_counter()
    step = progress.start_step + 1
    try:
        while step <= cfg.steps:
            step_metrics: dict[str, float] = {}
            batch_before = progress.batch
            try:
                micro, parts = step_with_backoff(job, model, data, opt, progress, step)
            except NonFiniteStep as exc:
                step = roll_back(job, model, opt, progress, good, origin, step, exc) + 1
                pending[:] = [(s, m) for s, m in pending if s < step]
                bar.n = step - 1
                bar.refresh()
                continue
            if progress.batch != batch_before:
                step_metrics["batch_size"] = progress.batch
            progress.images += progress.batch * cfg.gradient_accumulation
            step_loss = sum(micro) / len(micro)
            progress.history.append(step_loss)
            step_metrics["loss"] = step_loss
            if parts:
                step_metrics["instance_loss"] = sum(i for i, _ in parts) / len(parts)
                step_metrics["prior_loss"] = sum(p for _, p in parts) / len(parts)
            check = guard(step)
            if check is not None:
                step_metrics["thermal_throttled"] = float(check.throttled)
                step_metrics["thermal_paused_s"] = guard.paused_s
                t0 += check.paused_s  # a pause for heat is not training throughput
            pending.append((step, step_metrics))
            bar.update(1)
            postfix = {"loss": f"{step_loss:.4f}", "mem": _memory_now(job.dev)}
            if guard.last_state is not None:
                postfix["thermal"] = describe(guard.last_state)
            bar.set_postfix(postfix)
            interval = step % cfg.checkpoint_every == 0 or step == cfg.steps
            if interval and not _weights_finite(model):
                # Finite losses but weights that overflowed: never checkpoint (or save) them.
                step = roll_back(job, model, opt, progress, good, origin, step, NonFiniteStep("adapter weights", math.nan)) + 1
                pending[:] = [(s, m) for s, m in pending if s < step]
                bar.n = step - 1
                bar.refresh()
                continue
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                t_sample = time.perf_counter()
                log_intermediate_samples(job.fam, model.pipe, cfg, job.style, step, job.dev, job.tracker)
                t0 += time.perf_counter() - t_sample  # sampling is not training throughput
            if job.store is not None and interval:
                _save_checkpoint(job, model, opt, progress, step, mixed_precision)
                # Metrics are flushed with each checkpoint: per-step database writes would
                # slow the loop, and a crashed run still shows its curve up to here.
                _flush(job.tracker, pending)
            elif job.store is None and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                good = _snapshot(job, model, opt, progress, step, mixed_precision)
            if job.on_step is not None:
                job.on_step(step, step_loss)
            step += 1
    finally:
        bar.close()
        _flush(job.tracker, pending)
    return time.perf_counter() - t0, guard


def roll_back(
    job: TrainJob, model: Model, opt: Optimization, progress: Progress, good: Checkpoint, origin: Checkpoint,
    step: int, exc: NonFiniteStep,
) -> int:
    """Put the last good state back (the newer of the newest checkpoint and `good`; `origin`, the
    start of this run, when that state already diverged again after a rollback, since the
    high rate may have spoilt it without a NaN yet) and halve the learning rate; the step it
    rolled back to. :class:`TrainingDiverged` once `train.max_divergence_retries` retries are spent."""
    cfg = job.cfg
    lr = float(opt.optimizer.param_groups[0]["lr"])
    cause = str(exc)
    candidates = [c for c in (job.store.latest() if job.store is not None else None, good) if c is not None]
    target = max(candidates, key=lambda c: c.step)
    if target.step == progress.rolled_back_to:
        target = origin
    progress.rolled_back_to = target.step
    if progress.retries >= cfg.max_divergence_retries:
        raise TrainingDiverged(advice(job.style, step, cause, lr, progress.retries, job.mixed_precision,
                                      MAX_GRAD_NORM))
    progress.retries += 1
    state = cpu_copy(target.optimizer) if target.path is None else target.optimizer  # in memory: never aliased
    for p in model.params:
        p.grad = None
    load_trainable_state(model.denoiser, target.lora)
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.lr_schedule.load_state_dict(state["lr_scheduler"])
    if opt.ema is not None and "ema" in state:
        opt.ema.load_state_dict(state["ema"])
        opt.ema.to(device=job.dev)
    if opt.accelerator.scaler is not None and state.get("scaler"):
        opt.accelerator.scaler.load_state_dict(state["scaler"])
    set_rng_state(target.rng, opt.loop_gen, opt.noise_gen, job.dev)
    opt.accelerator.step = 0  # a good state is always on an optimizer-step boundary
    progress.history[:] = list(target.loss_history)
    new_lr = set_learning_rate(opt.optimizer, opt.lr_schedule, cfg.learning_rate * 0.5 ** progress.retries)
    where = f"checkpoint {target.path}" if target.path is not None else "the in-memory snapshot"
    log.warning("%s: step %d diverged (%s at learning rate %g); rolled back to step %d (%s), retry %d of %d at "
                "learning rate %g", job.style, step, cause, lr, target.step, where, progress.retries,
                cfg.max_divergence_retries, new_lr)
    job.tracker.log_metrics({"divergence_retries": progress.retries, "diverged_at_step": step,
                             "learning_rate": new_lr}, step=target.step)
    return target.step


def _weights_finite(model: Model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.params)


def evaluate(
    job: TrainJob, model: Model, data: Data, opt: Optimization, batch: int
) -> tuple[float | None, float | None]:
    """Swap in the EMA weights (if any), then (val loss, base val loss): the fixed-noise objective
    on the val set with and without the adapter; (None, None) without val images."""
    if opt.ema is not None:
        opt.ema.copy_to(model.params)  # the averaged adapter is the one evaluated and saved
    model.denoiser.eval()
    if data.val_buckets is None:
        return None, None
    args = (job.fam, model.pipe, model.scheduler, data.val_buckets, job.cfg.seed + 2, batch)
    val_loss = evaluate_buckets(*args)
    model.denoiser.disable_adapters()
    try:
        base_val_loss = evaluate_buckets(*args)
    finally:
        model.denoiser.enable_adapters()
    return val_loss, base_val_loss


def _checkpoint_state(
    opt: Optimization, progress: Progress, mixed_precision: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer state, meta) of a checkpoint."""
    opt_state = {"optimizer": opt.optimizer.state_dict(), "lr_scheduler": opt.lr_schedule.state_dict()}
    if opt.ema is not None:
        opt_state["ema"] = opt.ema.state_dict()
    if opt.accelerator.scaler is not None:
        opt_state["scaler"] = opt.accelerator.scaler.state_dict()
    meta = {"batch_size": progress.batch, "cpu_setup": [torch.get_num_threads(), mixed_precision]}
    if progress.retries:  # only after a rollback: checkpoints of runs that never diverged are unchanged
        meta["divergence_retries"] = progress.retries
    return opt_state, meta


def _save_checkpoint(
    job: TrainJob, model: Model, opt: Optimization, progress: Progress, step: int, mixed_precision: str
) -> None:
    opt_state, meta = _checkpoint_state(opt, progress, mixed_precision)
    job.store.save(
        step,
        trainable_state(model.denoiser),
        opt_state,
        rng_state(opt.loop_gen, opt.noise_gen, job.dev),
        progress.history,
        meta=meta,
    )


def _snapshot(
    job: TrainJob, model: Model, opt: Optimization, progress: Progress, step: int, mixed_precision: str
) -> Checkpoint:
    """The state a checkpoint would hold, in memory (CPU copies): the rollback target without checkpoints."""
    opt_state, meta = _checkpoint_state(opt, progress, mixed_precision)
    return snapshot(step, trainable_state(model.denoiser), opt_state, rng_state(opt.loop_gen, opt.noise_gen, job.dev),
                    progress.history, meta)


def _flush(tracker: Tracker, pending: list[tuple[int, dict[str, float]]]) -> None:
    tracker.log_metric_steps(pending)
    pending.clear()


def _memory_now(dev: torch.device) -> str:
    """Memory in use right now, for the progress bar: the accelerator's allocations, or on the
    CPU this process's resident set."""
    if dev.type == "cuda":
        used = torch.cuda.memory_allocated(dev)
    elif dev.type == "mps":
        used = torch.mps.current_allocated_memory()
    else:
        import psutil

        used = psutil.Process().memory_info().rss
    return f"{used / 2**30:.2f} GB"
