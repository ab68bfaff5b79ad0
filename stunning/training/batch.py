"""Batch size that fits the machine: out-of-memory detection, `batch_size: auto` probing, caps.

- :func:`is_oom_error` tells an out-of-memory failure (CUDA, MPS, the MPS tensor-size limits,
  the CPU allocator) from any other exception, so that only memory problems are retried;
- :func:`find_batch_size` probes the largest batch a trial step runs with: it doubles from
  `start` while the trial succeeds, backs off (halves) on an out-of-memory error, then bisects
  between the largest size that ran and the smallest that did not; never above `max_batch`,
  on MPS never above :func:`mps_batch_cap`, on the CPU never above what the measured memory
  growth of the trials projects to fit in 80 % of the available memory;
- :func:`free_memory` releases what a failed attempt left behind (Python garbage, the CUDA/MPS
  caching allocators) before the next one.

The trainer (`stunning.training.lora`) uses these for `train.batch_size: auto` and to halve
the batch when a training step runs out of memory.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

# Substrings of the RuntimeError messages PyTorch raises when memory runs out.
OOM_MESSAGES = (
    "CUDA out of memory",  # torch.cuda.OutOfMemoryError (and older torch's plain RuntimeError)
    "CUBLAS_STATUS_ALLOC_FAILED",  # cuBLAS could not allocate its workspace
    "MPS backend out of memory",  # the MPS allocator hit its high-watermark limit
    "total bytes of NDArray > 2**32",  # one MPS tensor above 4 GiB (MPSNDArray limit)
    "Invalid buffer size",  # an MPS buffer above the device's maximum buffer length
    "DefaultCPUAllocator: can't allocate memory",  # the CPU allocator's failure
)
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


def is_oom_error(exc: BaseException) -> bool:
    """True if `exc` means the device (or the CPU) ran out of memory.

    Recognises :class:`torch.OutOfMemoryError` (CUDA, and MPS in recent PyTorch), Python's
    :class:`MemoryError`, and RuntimeErrors whose message carries one of :data:`OOM_MESSAGES`
    (CUDA and MPS out of memory, the MPS tensor-size limits, the CPU allocator). Any other
    exception is not an OOM: it is a bug or bad input and must not be retried.
    """
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None)  # torch >= 2.5: one class for every device
    if oom is not None and isinstance(exc, oom):
        return True
    if isinstance(exc, RuntimeError):
        message = str(exc)
        return any(m in message for m in OOM_MESSAGES)
    return False


def free_memory(device: torch.device | str | None = None) -> None:
    """Release what a failed step left: Python garbage, then the device's cached blocks."""
    gc.collect()
    kind = torch.device(device).type if device is not None else None
    if kind in (None, "cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if kind in (None, "mps") and mps is not None and getattr(torch.backends, "mps", None) is not None:
        if torch.backends.mps.is_available():
            mps.empty_cache()


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
    :func:`is_oom_error`) frees memory and backs off (halves) until one runs, then bisects
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
