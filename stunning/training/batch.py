"""Batch size that fits the machine: `batch_size: auto` probing and its caps.

- :func:`find_batch_size` probes the largest batch a trial step runs with: it doubles from
  `start` while the trial succeeds, backs off (halves) on an out-of-memory error, then bisects
  between the largest size that ran and the smallest that did not; never above `max_batch`,
  on MPS never above :func:`mps_batch_cap`, on the CPU never above what the measured memory
  growth of the trials projects to fit in 80 % of the available memory;
- :func:`probe_batch_size` resolves `train.batch_size: auto` for a run: :func:`find_batch_size`
  over real training steps of the run's model that leave no trace on it.

The training loop (`stunning.training.loop`) uses these for `train.batch_size: auto` and to
halve the batch when a training step runs out of memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from stunning.config import TrainConfig
from stunning.training.memory import free_memory, is_oom_error
from stunning.training.precision import autocast, weight_dtype
from stunning.training.rng import global_rng_state, load_trainable_state, set_global_rng_state, trainable_state

log = logging.getLogger(__name__)

# MPSNDArray refuses tensors of 2**32 bytes or more (older macOS/PyTorch abort the process
# instead of raising), so a batch is sized to keep its largest tensor at half of that.
MPS_MAX_TENSOR_BYTES = 2**32
MPS_HEADROOM = 0.5
# On the CPU, running out of memory means swapping (or the OOM killer), not an exception: the
# next size is only tried when its projected memory fits this share of the available memory.
CPU_MEMORY_FRACTION = 0.8

TryStep = Callable[[int], object]
PeakGrowth = Callable[[Callable[[], object]], int]


class BatchSizeError(RuntimeError):
    """Even a batch of one image does not fit: the message says what to change."""


def mps_batch_cap(
    latent_shape: Sequence[int], *, heads: int = 8, patch_size: int = 1, bytes_per_element: int = 4
) -> int:
    """The largest batch whose biggest tensor stays within half the MPS per-tensor limit.

    `latent_shape` is one image's latent, (channels, height, width). The biggest tensor of a
    denoiser step is the self-attention score matrix at full latent resolution,
    batch x heads x tokens x tokens with tokens = (height / patch_size) x (width / patch_size)
    (the latent itself, batch x channels x height x width, is far smaller but is counted
    too). Example: SD 1.5 at 512 px has 64 x 64 latents, 4096 tokens, 8 heads: 512 MiB of
    float32 scores per image, so the cap is 4 (8 in float16). At least 1.
    """
    channels, height, width = (int(x) for x in latent_shape[-3:])
    tokens = max(1, height // max(1, patch_size)) * max(1, width // max(1, patch_size))
    per_image = max(heads * tokens * tokens, channels * height * width) * bytes_per_element
    return max(1, int(MPS_MAX_TENSOR_BYTES * MPS_HEADROOM) // per_image)


@dataclass(frozen=True)
class Trial:
    """One trial step: the batch size, whether it ran, and its measured memory growth (CPU)."""

    batch_size: int
    ok: bool
    growth_bytes: int | None = None


@dataclass
class BatchSearch:
    """The outcome of :func:`find_batch_size`: the size chosen, the cap, every trial."""

    batch_size: int
    cap: int
    trials: list[Trial] = field(default_factory=list)
    limited_by: str = ""  # max_batch, mps_cap, memory, oom

    @property
    def tried(self) -> list[int]:
        return [t.batch_size for t in self.trials]


def _rss_peak_growth() -> PeakGrowth:
    """A measure of the process's peak RSS during a call, above its RSS when this was made."""
    import psutil

    from stunning.device import MB, PeakMemory

    baseline = psutil.Process().memory_info().rss

    def measure(run: Callable[[], object]) -> int:
        with PeakMemory("cpu") as pm:
            run()
        return int(pm.peak_rss_mb * MB) - baseline

    return measure


def find_batch_size(
    try_step: TryStep,
    start: int,
    max_batch: int,
    device: torch.device | str,
    *,
    latent_shape: Sequence[int] | None = None,
    heads: int = 8,
    patch_size: int = 1,
    bytes_per_element: int = 4,
    available_bytes: int | None = None,
    peak_growth: PeakGrowth | None = None,
) -> BatchSearch:
    """The largest batch size for which `try_step(batch_size)` runs, probed with few trials.

    Doubles from `start` while the trial succeeds; on an out-of-memory error (see
    :func:`stunning.training.memory.is_oom_error`) frees memory and backs off (halves) until one runs, then bisects
    between the largest size that ran and the smallest that did not. Never tries more than
    `max_batch`; on MPS (with `latent_shape`) never more than :func:`mps_batch_cap`. On the
    CPU, where memory running out means swapping rather than an exception, each trial's peak
    RSS growth above the RSS at the start of the search (`peak_growth`, measured by default)
    is projected linearly to the next size, which is only tried when it fits in 80 % of
    `available_bytes` (default: psutil's available memory at the start of the search).

    Any exception that is not an out-of-memory error propagates unchanged. Raises
    :class:`BatchSizeError` when even a batch of 1 runs out of memory.
    """
    dev = torch.device(device)
    if start < 1 or max_batch < 1:
        raise ValueError(f"find_batch_size: start={start} and max_batch={max_batch} must be >= 1")
    cap, limited_by = max_batch, "max_batch"
    if dev.type == "mps" and latent_shape is not None:
        mps_cap = mps_batch_cap(latent_shape, heads=heads, patch_size=patch_size, bytes_per_element=bytes_per_element)
        if mps_cap < cap:
            cap, limited_by = mps_cap, "mps_cap"
    if dev.type == "cpu":
        if available_bytes is None:
            import psutil

            available_bytes = int(psutil.virtual_memory().available)
        if peak_growth is None:
            peak_growth = _rss_peak_growth()
    budget = CPU_MEMORY_FRACTION * available_bytes if available_bytes is not None else None

    search = BatchSearch(batch_size=0, cap=cap, limited_by=limited_by)
    lo, hi = 0, None  # largest size that ran; smallest that ran out of memory
    growth_lo: int | None = None
    size = min(start, cap)
    while True:
        failure = None
        growth = None
        try:
            if dev.type == "cpu" and peak_growth is not None:
                growth = peak_growth(lambda size=size: try_step(size))
            else:
                try_step(size)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            failure = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # Outside the except block, so the failed attempt's frames (and tensors) are gone.
        if failure is not None:
            free_memory(dev)
            search.trials.append(Trial(size, False))
            log.info("batch size %d: out of memory (%s)", size, failure)
            hi = size
            if lo == 0:
                if size == 1:
                    raise BatchSizeError(
                        f"even a batch of 1 image runs out of memory on {dev} ({failure}). Lower "
                        "data.resolution or train.rank, set train.gradient_checkpointing: true, or use "
                        "train.mixed_precision fp16/bf16 on a GPU."
                    )
                size //= 2
                continue
        else:
            search.trials.append(Trial(size, True, growth))
            log.info("batch size %d: ok%s", size, f" (+{growth / 2**20:.0f} MB)" if growth is not None else "")
            lo, growth_lo = size, growth
        nxt = min(2 * lo, cap) if hi is None else (lo + hi) // 2
        memory_bound = False
        if budget is not None and growth_lo is not None and growth_lo > 0:
            fits = int(budget * lo // growth_lo)  # linear in the batch: growth_lo / lo per image
            if fits < nxt:
                nxt, memory_bound = fits, True
        if nxt <= lo:
            search.batch_size = lo
            if memory_bound:
                search.limited_by = "memory"
            elif hi is not None:
                search.limited_by = "oom"
            log.info(
                "batch_size auto: %d (tried %s; limited by %s)",
                lo,
                ", ".join(map(str, search.tried)),
                search.limited_by,
            )
            return search
        size = nxt


def _attention_geometry(denoiser: torch.nn.Module) -> tuple[int, int]:
    """(attention heads, patch size) of a diffusers denoiser, for the MPS batch cap.

    Transformers (sd3) name their heads `num_attention_heads`; the SD 1.x UNet's
    `attention_head_dim` is, despite its name, its number of heads. Unknown: 8 heads, no patches.
    """
    config = dict(getattr(denoiser, "config", {}) or {})
    heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 8
    if isinstance(heads, list | tuple):
        heads = max((h for h in heads if isinstance(h, int)), default=8)
    patch = config.get("patch_size") or 1
    return int(heads), int(patch) if isinstance(patch, int) else 1


def probe_batch_size(
    fam,
    pipe,
    params: list[torch.nn.Parameter],
    scheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    cfg: TrainConfig,
    dev: torch.device,
    mixed_precision: str,
    per_step: int = 1,
) -> int:
    """Resolve `batch_size: auto` with trial steps that leave no trace on the run.

    `per_step`: images a step trains on per unit of batch size (2 with prior preservation:
    the instance batch plus as many class images); trials use that many.

    Runs before the run's optimizer, schedule and generators are created. Each trial is one
    forward/backward (in training mode, under the run's autocast, with gradient checkpointing
    if enabled) and one step of a throwaway AdamW (its state is part of the memory), on the
    first images of the train set with noise from a throwaway generator. Afterwards the
    adapter weights are copied back from before the trials, the gradients dropped and torch's
    global RNG (LoRA dropout) restored, so the run trains exactly as if the chosen size had
    been set in the config.
    """
    denoiser = fam.denoiser(pipe)
    heads, patch = _attention_geometry(denoiser)
    snapshot = trainable_state(denoiser)
    rng = global_rng_state(dev)
    was_training = denoiser.training
    probe_opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
    n = latents.shape[0]

    def trial(batch_size: int) -> None:
        idx = (torch.arange(batch_size * per_step) % n).to(latents.device)
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        try:
            with autocast(dev, mixed_precision):
                loss = fam.training_loss(pipe, latents[idx], cond[idx], gen, scheduler=scheduler)
            loss.backward()
            probe_opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)  # an asynchronous failure surfaces here, not in training
        finally:
            probe_opt.zero_grad(set_to_none=True)

    denoiser.train()
    try:
        search = find_batch_size(
            trial,
            1,
            cfg.max_batch_size,
            dev,
            latent_shape=tuple(latents.shape[1:]),
            heads=heads,
            patch_size=patch,
            bytes_per_element=weight_dtype(mixed_precision).itemsize,
        )
    finally:
        probe_opt.state.clear()  # its moments are the trials', and memory the run needs
        load_trainable_state(denoiser, snapshot)
        set_global_rng_state(rng, dev)
        denoiser.train(was_training)
        free_memory(dev)
    return search.batch_size
