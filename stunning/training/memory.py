"""Running out of memory: telling an out-of-memory failure from any other error, and freeing
what a failed attempt left behind.

- :func:`is_oom_error` tells an out-of-memory failure (CUDA, MPS, the MPS tensor-size limits,
  the CPU allocator) from any other exception, so that only memory problems are retried;
- :func:`free_memory` releases what a failed attempt left behind (Python garbage, the CUDA/MPS
  caching allocators) before the next one.

Used by the batch-size probe (`stunning.training.batch`), the CPU calibration
(`stunning.training.precision`) and the loop's halve-and-redo of a step (`stunning.training.loop`).
"""

from __future__ import annotations

import gc

import torch

# Substrings of the RuntimeError messages PyTorch raises when memory runs out.
OOM_MESSAGES = (
    "CUDA out of memory",  # torch.cuda.OutOfMemoryError (and older torch's plain RuntimeError)
    "CUBLAS_STATUS_ALLOC_FAILED",  # cuBLAS could not allocate its workspace
    "MPS backend out of memory",  # the MPS allocator hit its high-watermark limit
    "total bytes of NDArray > 2**32",  # one MPS tensor above 4 GiB (MPSNDArray limit)
    "Invalid buffer size",  # an MPS buffer above the device's maximum buffer length
    "DefaultCPUAllocator: can't allocate memory",  # the CPU allocator's failure
)

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
