"""The frozen base in low precision (QLoRA): which precision a run's base weights take, and
quantizing the denoiser to int8/int4 before the LoRA adapter is added.

`train.base_precision` names the storage of the frozen base:

- ``fp32``: float32 weights (compute may still autocast to bf16/fp16 per `train.mixed_precision`);
- ``bf16`` / ``fp16``: every component loaded in that half type, trained under its autocast;
- ``int8`` / ``int4``: the pipeline loaded in the compute type (`train.mixed_precision`: float32
  on a CPU), then every ``nn.Linear``/``nn.Conv2d`` weight of the denoiser quantized
  (weight-only: int8 with one absmax scale per output channel, int4 with a scale and shift per
  group of up to 128 inputs) and frozen; norms, embeddings, biases, the VAE and the text
  encoders stay in the compute type. The LoRA adapter (PEFT) wraps the quantized layers and its
  own weights stay float32, so the saved adapter is the same diffusers LoRA file an fp32 run
  writes and loads on the unquantized base;
- ``auto``: the research plan's precision (``reports/research.json``), else the weight type of
  `train.mixed_precision` (the behaviour before base_precision existed).

Backend: optimum-quanto. PEFT 0.21 has dedicated LoRA layers for bitsandbytes (CUDA-first;
Linear only), torchao (int8 only) and HQQ, none of which is installed or covers int4 and Conv2d
on the CPU; quanto's ``QLinear``/``QConv2d`` subclass ``nn.Linear``/``nn.Conv2d``, so PEFT's
standard LoRA layers wrap them (the base layer's forward dequantizes, LoRA adds ``B(A(x))``;
merging into a quantized layer is never done: adapters are saved, not merged), and quanto
runs on CPU, CUDA and MPS with pure-torch fallbacks. The project's inference quantization
(`stunning.quantize`) uses the same library.

Memory: on a CPU the pipeline is loaded in float32 before the denoiser is quantized, so the
load briefly holds the float32 denoiser (the process peak includes it); on a GPU or MPS it is
loaded and quantized on the CPU and only then moved, so device memory only ever holds the
quantized weights.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stunning.config import ConfigError, TrainConfig
from stunning.training.precision import weight_dtype

log = logging.getLogger(__name__)

# quanto's weight types of the quantized precisions.
QUANTO_QTYPES = {"int8": "qint8", "int4": "qint4"}
HALF = ("bf16", "fp16")
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")  # train.base_precision's values besides auto
# What `auto` means without a research plan: the weight type `train.mixed_precision` loads.
FROM_MIXED_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
BACKEND = "optimum-quanto"


def trainable_precisions(device_type: str, bf16_supported: bool = True) -> list[str]:
    """Base precisions the trainer runs on a device of this type, highest first.

    CPU: fp32, bf16 (autocast bf16; slow without AVX512-BF16/AMX), int8, int4 (quanto's CPU
    path) — no fp16 (CPU fp16 autocast is refused by :func:`resolve_mixed_precision`). CUDA:
    all, bf16 only where the GPU supports it. MPS: fp32, fp16, int8, int4 (bf16 depends on
    the chip and macOS: the trainer's `mixed_precision: auto` picks it, the plan does not).
    """
    if device_type == "cuda":
        return [p for p in PRECISIONS if p != "bf16" or bf16_supported]
    if device_type == "mps":
        return ["fp32", "fp16", "int8", "int4"]
    return ["fp32", "bf16", "int8", "int4"]


@dataclass(frozen=True)
class BasePrecision:
    """The resolved precision of a run's frozen base and of its compute."""

    precision: str  # fp32, bf16, fp16, int8 or int4
    requested: str  # train.base_precision as written (may be auto)
    source: str  # where the precision came from, for the report
    mixed_precision: str  # accelerate's mixed precision: no, bf16 or fp16

    @property
    def quantized(self) -> bool:
        return self.precision in QUANTO_QTYPES

    @property
    def load_dtype(self) -> torch.dtype:
        """dtype the pipeline is loaded in: the half type of a half base, else the compute type."""
        return weight_dtype(self.mixed_precision if self.quantized else self.precision)

    def as_dict(self) -> dict[str, str]:
        return {
            "base_precision": self.precision,
            "base_precision_requested": self.requested,
            "base_precision_source": self.source,
            "base_quantization_backend": BACKEND if self.quantized else "none",
        }


def plan_precision(report: Mapping[str, Any], where: str = "the research report") -> tuple[str, str]:
    """(precision, device) the research report's plan recommends; ConfigError if it has none."""
    plan = report.get("plan") if isinstance(report, Mapping) else None
    if not isinstance(plan, Mapping):
        raise ConfigError(f"{where} has no 'plan' section; rerun the research stage (dvc repro research).")
    precision = plan.get("precision")
    if precision is None:
        raise ConfigError(
            f"train.base_precision auto: {where} found no precision at which training fits "
            f"({plan.get('reason', 'no reason given')}). Set train.base_precision explicitly "
            "(int4 is the smallest) to try anyway, or choose a smaller base model."
        )
    known = PRECISIONS
    if precision not in known:
        raise ConfigError(f"{where}: plan.precision {precision!r} is not one of {list(known)}.")
    return str(precision), str(plan.get("device", "cpu"))


def resolve_base_precision(
    cfg: TrainConfig, device: torch.device, research: Mapping[str, Any] | None = None,
    where: str = "the research report",
) -> BasePrecision:
    """The run's :class:`BasePrecision` from `train.base_precision`, `train.mixed_precision`,
    the device and (for auto) the research report's plan. ConfigError naming the key when the
    device cannot run the precision or the two settings disagree."""
    from stunning.training.precision import resolve_mixed_precision

    try:
        mixed = resolve_mixed_precision(cfg.mixed_precision, device)
    except ValueError as exc:
        raise ConfigError(f"train.mixed_precision: {exc}") from None
    requested = cfg.base_precision
    if requested != "auto":
        precision, source = requested, "train.base_precision"
    elif research is not None:
        precision, plan_device = plan_precision(research, where)
        source = f"research plan ({where})"
        if plan_device != device.type:
            log.warning("the research plan was made for %s but training runs on %s", plan_device, device.type)
    else:
        precision, source = FROM_MIXED_PRECISION[mixed], "train.mixed_precision (no research plan)"
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    allowed = trainable_precisions(device.type, bf16_ok)
    if precision not in allowed:
        raise ConfigError(
            f"train.base_precision {precision!r} (from {source}) cannot train on {device.type}: "
            f"use one of {allowed}."
        )
    if precision in HALF:
        if cfg.mixed_precision == "auto":
            mixed = precision  # half weights are trained under their own autocast
        elif mixed != precision:
            raise ConfigError(
                f"train.base_precision {precision} keeps the frozen weights in {precision}, which needs "
                f"train.mixed_precision {precision} (or auto), not {cfg.mixed_precision}."
            )
    return BasePrecision(precision, requested, source, mixed)


def load_quanto_kernel() -> Any:
    """Load optimum-quanto's CPU kernel (it unpacks int4 weights) with the `ninja` of this
    interpreter's environment, building it on first use.

    quanto builds the kernel with torch's JIT extension loader, which runs the first `ninja` on
    PATH. The project's environment has its own (pip's `ninja`, a quanto dependency); a system
    ninja of another version records the build commands under other hashes, so the two rebuilt
    the kernel in turn (~40 s each; 14 rebuilds in one morning here) whenever one process ran with
    `.venv/bin` on PATH (make, DVC's stages) and the next without (`.venv/bin/python -m pytest`,
    `.venv/bin/stunning`). Loaded here first, every process uses the same ninja; afterwards
    quanto reuses the loaded library (returned). A kernel that cannot be built raises (the caller
    reports the level as not runnable)."""
    from optimum.quanto.library.extensions import get_extension

    ext = get_extension("quanto_cpp")
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if not (Path(bindir) / "ninja").is_file() or path.split(os.pathsep)[0] == bindir:
        return ext.lib
    os.environ["PATH"] = bindir + os.pathsep + path
    try:
        return ext.lib
    finally:
        os.environ["PATH"] = path


def quantize_frozen_denoiser(denoiser: torch.nn.Module, precision: str) -> dict[str, int]:
    """Quantize (and freeze) every Linear/Conv2d weight of `denoiser` in place with quanto.

    Call before the LoRA adapter is added: PEFT then wraps the quantized layers. Returns the
    number of quantized modules and the bytes of the denoiser's tensors before and after.
    """
    from optimum.quanto import freeze, quantize

    if precision not in QUANTO_QTYPES:
        raise ValueError(f"cannot quantize to {precision!r}; one of {list(QUANTO_QTYPES)}")
    if precision == "int4":
        load_quanto_kernel()
    before = module_bytes(denoiser)
    denoiser.requires_grad_(False)
    quantize(denoiser, weights=QUANTO_QTYPES[precision])
    freeze(denoiser)
    denoiser.requires_grad_(False)
    n = sum(1 for m in denoiser.modules() if getattr(m, "weight_qtype", None) is not None)
    after = module_bytes(denoiser)
    log.info("denoiser quantized to %s with %s: %d modules, %.1f -> %.1f MB", precision, BACKEND, n,
             before / 2**20, after / 2**20)
    return {"quantized_modules": n, "bytes_before": before, "bytes_after": after}


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored (quantized data + scales for quanto)."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        total += tensor_bytes(t)
    return total


def tensor_bytes(t: torch.Tensor) -> int:
    """Stored bytes of a tensor; a quanto tensor counts its inner tensors (data, scale, shift)."""
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = inner()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()
