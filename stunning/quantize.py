"""Int8 weight quantization of the denoiser with optimum-quanto, and how much it costs.

Weight-only int8 (per-output-channel absmax scales; activations stay in float) is the
quantization that works on every device the project targets — CPU, CUDA and MPS — without
calibration data. quanto swaps every ``nn.Linear``/``nn.Conv2d`` of the denoiser for its
quantized module; norms, embeddings and biases stay in float.

On disk, ``models/merged/quantized/`` holds what quanto needs to rebuild the model without
quantizing again: the frozen state dict (``int8 data`` + ``scale`` per weight) as
safetensors, ``quantization_map.json`` (which module got which qtype), the denoiser's
``config.json``, and ``quantized.json`` (which pipeline component it replaces). It is not a
stock diffusers folder: :func:`load_quantized` puts it back into the fused pipeline.

:func:`measure` reports size on disk, peak memory of a generation, and output fidelity
(pixel MSE and max abs difference in [0, 1]) against the unquantized model on fixed prompts.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stunning.io import atomic_dir, atomic_write_text, canonicalize_safetensors

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

WEIGHTS_FILE = "quantized_model.safetensors"
QMAP_FILE = "quantization_map.json"
META_FILE = "quantized.json"
SCHEMES = {"int8-weight": "qint8"}


class QuantizationError(ValueError):
    """A quantized folder is missing or does not match the pipeline; the message says what to do."""


@dataclass
class QuantizeResult:
    path: Path
    component: str
    scheme: str
    quantized_modules: int
    fp32_bytes: int  # the denoiser's float32 weights on disk (the fused pipeline's file)
    quantized_bytes: int
    fp32_memory_bytes: int = 0  # tensors held in memory by the denoiser, before and after
    quantized_memory_bytes: int = 0

    @property
    def size_ratio(self) -> float:
        return self.quantized_bytes / self.fp32_bytes if self.fp32_bytes else float("nan")


def _component_name(pipe: Any, module: Any) -> str:
    """Which pipeline component is the denoiser (`unet` for SD, `transformer` for DiT families)."""
    for name, comp in pipe.components.items():
        if comp is module:
            return name
    raise QuantizationError("the family's denoiser is not a component of its pipeline; cannot save it separately")


def component_bytes(pipeline_dir: str | Path, component: str) -> int:
    """Bytes of a pipeline component's weight files on disk (safetensors or .bin)."""
    folder = Path(pipeline_dir) / component
    files = [p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin")]
    if not files:
        raise QuantizationError(f"{folder}: no weight files (.safetensors/.bin) found")
    return sum(p.stat().st_size for p in files)


def _state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def quantize_denoiser(
    pipeline_dir: str | Path,
    family: Any,
    out_dir: str | Path,
    scheme: str = "int8-weight",
) -> QuantizeResult:
    """Quantize the denoiser of the pipeline at ``pipeline_dir`` and save it to ``out_dir``."""
    import torch
    from optimum.quanto import freeze, qint8, quantization_map, quantize
    from safetensors.torch import save_file

    if scheme not in SCHEMES:
        raise QuantizationError(f"merge.quantization={scheme!r} is not supported; use one of {sorted(SCHEMES)}")
    pipe = family.load_pipeline(Path(pipeline_dir), torch.device("cpu"), torch.float32)
    model = family.denoiser(pipe)
    component = _component_name(pipe, model)
    fp32_memory = _state_bytes(model.state_dict())
    quantize(model, weights=qint8)
    freeze(model)
    qmap = quantization_map(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "quantization": scheme})
        canonicalize_safetensors(tmp / WEIGHTS_FILE)
        atomic_write_text(tmp / QMAP_FILE, json.dumps(qmap, indent=2, sort_keys=True) + "\n")
        model.save_config(tmp)
        meta = {
            "component": component,
            "class": type(model).__name__,
            "scheme": scheme,
            "qtype": SCHEMES[scheme],
            "source": str(pipeline_dir),
            "library": "optimum-quanto",
            "note": f"load with stunning.quantize.load_quantized(<fused pipeline>, {out_dir.name})",
        }
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2) + "\n")
    result = QuantizeResult(
        path=out_dir,
        component=component,
        scheme=scheme,
        quantized_modules=len(qmap),
        fp32_bytes=component_bytes(pipeline_dir, component),
        quantized_bytes=(out_dir / WEIGHTS_FILE).stat().st_size,
        fp32_memory_bytes=fp32_memory,
        quantized_memory_bytes=_state_bytes(state),
    )
    log.info(
        "quantized %s (%d modules, %s): %d -> %d bytes (%.2fx)",
        component, result.quantized_modules, scheme, result.fp32_bytes, result.quantized_bytes, result.size_ratio,
    )
    return result


def load_quantized_denoiser(quantized_dir: str | Path, device: torch.device | str = "cpu"):
    """Rebuild the quantized denoiser (config on the meta device, then quanto's `requantize`)."""
    import diffusers
    import torch
    from optimum.quanto import requantize
    from safetensors.torch import load_file

    qdir = Path(quantized_dir)
    for name in (WEIGHTS_FILE, QMAP_FILE, META_FILE, "config.json"):
        if not (qdir / name).is_file():
            raise QuantizationError(f"{qdir / name} is missing: rebuild it with `dvc repro merge`.")
    meta = json.loads((qdir / META_FILE).read_text())
    cls = getattr(diffusers, meta["class"], None)
    if cls is None:
        raise QuantizationError(f"{qdir / META_FILE}: unknown diffusers class {meta['class']!r}")
    config = cls.load_config(str(qdir))
    with torch.device("meta"):
        model = cls.from_config(config)
    requantize(
        model,
        load_file(str(qdir / WEIGHTS_FILE)),
        json.loads((qdir / QMAP_FILE).read_text()),
        device=torch.device(device),
    )
    model.eval()
    return model, meta["component"]


def load_quantized(fused_pipeline_dir: str | Path, quantized_dir: str | Path, device: torch.device | str = "cpu"):
    """The fused pipeline with its denoiser replaced by the quantized one (float32 elsewhere).

    The other components load in float32: quanto's int8 weights dequantize into the
    activation dtype, and float32 keeps the comparison with the unquantized model about
    quantization alone.
    """
    import torch
    from diffusers import DiffusionPipeline

    model, component = load_quantized_denoiser(quantized_dir, device)
    from stunning.families import absent_components

    pipe = DiffusionPipeline.from_pretrained(
        str(fused_pipeline_dir), local_files_only=True, dtype=torch.float32,
        **{**absent_components(Path(fused_pipeline_dir)), component: model},
    )
    pipe.set_progress_bar_config(disable=True)
    for name, comp in pipe.components.items():
        if name != component and isinstance(comp, torch.nn.Module):
            comp.to(device)
    return pipe


def image_fidelity(reference: list[Image.Image], candidate: list[Image.Image]) -> dict[str, float]:
    """Pixel MSE and max abs difference (range [0, 1]) between paired images."""
    import numpy as np

    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference images but {len(candidate)} candidates")
    a = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 for im in reference])
    b = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 for im in candidate])
    return {"mse": float(((a - b) ** 2).mean()), "max_abs": float(np.abs(a - b).max())}


@dataclass
class GenerationRun:
    images: list
    peak_memory_mb: float
    delta_memory_mb: float
    seconds_per_image: float


def _timed_generation(load, family: Any, prompts: list[str], seeds: list[int], steps: int, guidance: float, device):
    """Load (via `load()`) and generate under one PeakMemory: the memory a user needs to run it."""
    from stunning.device import PeakMemory

    with PeakMemory(device) as pm:
        pipe = load()
        t0 = time.perf_counter()
        images = family.generate(pipe, prompts, seeds, steps, guidance)
        elapsed = time.perf_counter() - t0
    del pipe
    gc.collect()
    return GenerationRun(images, pm.peak_mb, pm.delta_mb, elapsed / max(1, len(images)))


def measure(
    fused_dir: str | Path,
    quantize_result: QuantizeResult,
    family: Any,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Size, peak memory and fidelity of the quantized vs the float32 fused model.

    Every (prompt, seed) pair is generated, so both runs see identical inputs. The float32
    run goes first and is freed before the int8 one; on CPU the peak is the process RSS, so
    the int8 peak includes allocator memory the first run left behind and understates the
    saving (the delta is reported too).
    """
    import torch

    device = torch.device(device)
    pairs = [(p, s) for p in prompts for s in seeds]
    ps, ss = [p for p, _ in pairs], [s for _, s in pairs]
    fp32 = _timed_generation(
        lambda: family.load_pipeline(Path(fused_dir), device, torch.float32), family, ps, ss, steps, guidance_scale, device
    )
    int8 = _timed_generation(
        lambda: load_quantized(fused_dir, quantize_result.path, device), family, ps, ss, steps, guidance_scale, device
    )
    fid = image_fidelity(fp32.images, int8.images)
    report = {
        "fp32_denoiser_bytes": quantize_result.fp32_bytes,
        "int8_denoiser_bytes": quantize_result.quantized_bytes,
        "size_ratio": round(quantize_result.size_ratio, 6),
        "quantized_modules": quantize_result.quantized_modules,
        "denoiser_memory_mb_fp32": round(quantize_result.fp32_memory_bytes / 2**20, 3),
        "denoiser_memory_mb_int8": round(quantize_result.quantized_memory_bytes / 2**20, 3),
        "peak_memory_mb_fp32": round(fp32.peak_memory_mb, 2),
        "peak_memory_mb_int8": round(int8.peak_memory_mb, 2),
        "memory_delta_mb_fp32": round(fp32.delta_memory_mb, 2),
        "memory_delta_mb_int8": round(int8.delta_memory_mb, 2),
        "latency_s_fp32": round(fp32.seconds_per_image, 4),
        "latency_s_int8": round(int8.seconds_per_image, 4),
        "quantization_mse": fid["mse"],
        "quantization_max_abs": fid["max_abs"],
        "fidelity_images": len(pairs),
        "device": str(device),
    }
    log.info("quantization: %s", {k: report[k] for k in ("size_ratio", "quantization_mse", "quantization_max_abs")})
    return report


def result_dict(result: QuantizeResult) -> dict[str, Any]:
    d = asdict(result)
    d["path"] = str(result.path)
    d["size_ratio"] = result.size_ratio
    return d
