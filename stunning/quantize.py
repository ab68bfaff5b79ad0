"""The quantization ladder: the denoiser at int8, fp8, int4 and NF4 weights, what each costs
and keeps, and the choice of the smallest level that stays within the budgets.

Levels (:data:`LEVELS`), all weight-only (activations stay float32, no calibration data):

- ``int8``: optimum-quanto ``qint8`` (per-output-channel absmax scales);
- ``fp8``: optimum-quanto ``qfloat8`` (e4m3 weights with per-channel scales);
- ``int4``: optimum-quanto ``qint4`` (groups of 128 input channels, a scale and shift each;
  the first use compiles quanto's small C++ unpack extension into its package folder, once);
- ``nf4``: bitsandbytes NF4 (QLoRA's normal-float 4 bits, blocks of 64) through its CPU backend.
  Every ``nn.Linear`` is quantized, then checked: its bitsandbytes forward must equal a
  reference NF4 dequantization (pure torch) on a probe input. bitsandbytes 0.50.2's native
  CPU dequantize is wrong when a row's length is not a multiple of the block size (measured:
  max error 1.9 on a 64x32 N(0, 1) matrix vs 0.39 for NF4 itself), so such layers stay float32
  and the level reports how many (``kept_float``); a level with nothing left to quantize
  reports ``runs: false`` with the reason. Conv layers are never NF4 (bitsandbytes has none).

quanto swaps ``nn.Linear``/``nn.Conv2d`` for its quantized modules; norms, embeddings and
biases stay float. On disk a level folder ``<out>/<level>/`` holds the fused model's
quantized denoiser (``quantized_model.safetensors``, ``quantization_map.json``, the
denoiser's ``config.json``, ``quantized.json``) and the base model's in ``<level>/base/`` (the
style adapters are served on it). :func:`load_quantized` rebuilds a pipeline from a level
folder in any process; given the ladder folder itself (``<out>/``, whose ``quantized.json``
is an index naming the chosen level) it loads the chosen level.

:func:`measure_ladder` generates the float32 references once (fused model; each adapter on the
base, on the fixed prompts and on content-matched style sets from :mod:`stunning.validation`),
then per level loads the saved models from disk and measures peak memory, seconds per image,
PSNR and SSIM against float32, and per adapter the style gain it keeps.
:func:`choose_level` picks the smallest passing level (pure: reports in, choice and reasons out).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
BASE_SUBDIR = "base"


@dataclass(frozen=True)
class Level:
    name: str
    backend: str  # optimum-quanto | bitsandbytes
    qtype: str  # quanto qtype name, or the bitsandbytes quant_type
    bits: int


LEVELS: dict[str, Level] = {
    "int8": Level("int8", "optimum-quanto", "qint8", 8),
    "fp8": Level("fp8", "optimum-quanto", "qfloat8", 8),
    "int4": Level("int4", "optimum-quanto", "qint4", 4),
    "nf4": Level("nf4", "bitsandbytes", "nf4", 4),
}
DEFAULT_LADDER: tuple[str, ...] = ("int8", "fp8", "int4", "nf4")
NF4_BLOCKSIZE = 64
PSNR_IDENTICAL = 100.0  # dB reported for identical images (the MSE is 0)

# Apple unified memory: Metal's recommended working set is about two thirds of it on these
# sizes (`recommendedMaxWorkingSetSize`, e.g. 10.7 GB of 16 GB); the rest is the OS's.
APPLE_TARGETS: dict[str, float] = {f"apple-{gb}gb": gb * 1024 * 2 / 3 for gb in (8, 16, 24, 32)}


class QuantizationError(ValueError):
    """A quantized folder is missing or does not match the pipeline; the message says what to do."""


class LevelUnavailable(RuntimeError):
    """A level cannot run on this machine (the message says why); reported, never faked."""


@dataclass
class QuantizeResult:
    path: Path
    component: str
    scheme: str  # the level name (int8, fp8, int4, nf4)
    quantized_modules: int
    fp32_bytes: int  # the denoiser's float32 weights on disk (the pipeline's file)
    quantized_bytes: int
    fp32_memory_bytes: int = 0  # tensors held in memory by the denoiser, before and after
    quantized_memory_bytes: int = 0
    backend: str = "optimum-quanto"
    kept_float: list[str] = field(default_factory=list)  # modules the level could not quantize

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


def level_of(name: str) -> Level:
    """The :class:`Level` called `name` (the old scheme `int8-weight` is int8)."""
    name = "int8" if name == "int8-weight" else name
    if name not in LEVELS:
        raise QuantizationError(f"quantization level {name!r} is not known; use one of {list(LEVELS)}")
    return LEVELS[name]


# --------------------------------------------------------------------------- NF4 (bitsandbytes)


def _nf4_reference(weight: torch.Tensor, code: torch.Tensor, blocksize: int = NF4_BLOCKSIZE) -> torch.Tensor:
    """NF4 quantize + dequantize in plain torch (QLoRA, Dettmers et al. 2023, sec. 3): flat
    blocks of `blocksize`, each scaled by its absmax and rounded to the nearest code value."""
    import torch

    flat = weight.detach().float().reshape(-1)
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, (-n) % blocksize)).reshape(-1, blocksize)
    absmax = blocks.abs().amax(1, keepdim=True).clamp_min(1e-12)
    idx = ((blocks / absmax).unsqueeze(-1) - code).abs().argmin(-1)
    return (code[idx] * absmax).reshape(-1)[:n].reshape(weight.shape)


def _nf4_linear(child: Any) -> Any:
    import bitsandbytes as bnb
    import torch

    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                          compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=False, blocksize=NF4_BLOCKSIZE, module=q)
    if child.bias is not None:
        q.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # bitsandbytes quantizes on the move to a device


def _linear_children(model: Any) -> list[tuple[str, Any, str, Any]]:
    import torch

    out = []
    for name, mod in model.named_modules():
        for cname, child in mod.named_children():
            if type(child) is torch.nn.Linear:
                out.append((f"{name}.{cname}" if name else cname, mod, cname, child))
    return out


def _quantize_nf4(model: Any) -> tuple[dict[str, Any], list[str]]:
    """Swap every Linear for a verified bitsandbytes NF4 one; return (quantization map, kept float)."""
    try:
        import bitsandbytes as bnb  # noqa: F401
        import bitsandbytes.functional as bnbf
    except ImportError as exc:
        raise LevelUnavailable(f"bitsandbytes is not installed ({exc}); `pip install bitsandbytes==0.50.2`") from None
    import torch

    code = bnbf.get_4bit_type("nf4", device="cpu")
    gen = torch.Generator().manual_seed(0)
    qmap: dict[str, Any] = {}
    kept: list[str] = []
    errors: dict[str, str] = {}
    for full, parent, cname, child in _linear_children(model):
        try:
            q = _nf4_linear(child).eval()  # eval: the inference path (bitsandbytes repacks for CPU kernels)
            probe = torch.randn(3, child.in_features, generator=gen)
            with torch.no_grad():
                got = q(probe)
                want = torch.nn.functional.linear(probe, _nf4_reference(child.weight, code), child.bias)
            ok = torch.allclose(got, want, atol=1e-4, rtol=1e-4)
            if not ok:
                errors[full] = f"forward differs from reference NF4 by {float((got - want).abs().max()):.3g}"
        except Exception as exc:  # noqa: BLE001 - a backend failure for this shape: the layer stays float
            ok, errors[full] = False, f"{type(exc).__name__}: {exc}"
        if ok:
            setattr(parent, cname, q)
            qmap[full] = {"weights": "nf4", "blocksize": NF4_BLOCKSIZE}
        else:
            kept.append(full)
    if not qmap:
        first = next(iter(errors.items()), ("-", "no Linear layers"))
        raise LevelUnavailable(
            f"bitsandbytes' CPU NF4 did not reproduce the reference NF4 on any of the {len(kept)} Linear layers of "
            f"this denoiser (e.g. {first[0]}: {first[1]}); nothing could be quantized"
        )
    if kept:
        log.warning("nf4: %d of %d Linear layers kept float32 (bitsandbytes' CPU kernels fail or are wrong for their "
                    "shape): %s", len(kept), len(kept) + len(qmap), errors)
    return qmap, kept


def _load_nf4(model: Any, state: dict[str, torch.Tensor], qmap: Mapping[str, Any], device: Any) -> None:
    import bitsandbytes as bnb
    import torch

    modules = dict(model.named_modules())
    rest = dict(state)
    for full in qmap:
        parent_name, _, cname = full.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        child = getattr(parent, cname)
        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4")
        prefix = f"{full}.weight."
        stats = {k[len(prefix):]: rest.pop(k) for k in [k for k in rest if k.startswith(prefix)]}
        q.weight = bnb.nn.Params4bit.from_prequantized(rest.pop(f"{full}.weight"), stats, device=torch.device(device),
                                                       module=q)
        if child.bias is not None:
            q.bias = torch.nn.Parameter(rest.pop(f"{full}.bias").to(device), requires_grad=False)
        setattr(parent, cname, q)
    missing, unexpected = model.load_state_dict(rest, strict=False)
    nf4_keys = {f"{full}.{p}" for full in qmap for p in ("weight", "bias")}
    missing = [k for k in missing if k not in nf4_keys]
    if missing or unexpected:
        raise QuantizationError(f"nf4 weights do not match the denoiser: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device)


# --------------------------------------------------------------------------- quantize / save / load


def _quantize_model(model: Any, level: Level) -> tuple[dict[str, Any], list[str]]:
    if level.backend == "bitsandbytes":
        return _quantize_nf4(model)
    import optimum.quanto as quanto

    try:
        if level.bits == 4:
            from stunning.training.quantized import load_quanto_kernel

            load_quanto_kernel()
        quanto.quantize(model, weights=getattr(quanto, level.qtype))
        quanto.freeze(model)
    except Exception as exc:  # noqa: BLE001 - e.g. the int4 extension does not compile here
        raise LevelUnavailable(f"optimum-quanto {level.qtype} failed ({type(exc).__name__}: {exc})") from None
    return quanto.quantization_map(model), []


def quantize_denoiser(
    pipeline_dir: str | Path,
    family: Any,
    out_dir: str | Path,
    scheme: str = "int8",
) -> QuantizeResult:
    """Quantize the denoiser of the pipeline at ``pipeline_dir`` to level ``scheme`` and save it to
    ``out_dir``. Raises :class:`LevelUnavailable` when the level cannot run on this machine."""
    import torch
    from safetensors.torch import save_file

    level = level_of(scheme)
    pipe = family.load_pipeline(Path(pipeline_dir), torch.device("cpu"), torch.float32)
    model = family.denoiser(pipe)
    component = _component_name(pipe, model)
    fp32_memory = _state_bytes(model.state_dict())
    qmap, kept = _quantize_model(model, level)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "quantization": level.name})
        canonicalize_safetensors(tmp / WEIGHTS_FILE)
        atomic_write_text(tmp / QMAP_FILE, json.dumps(qmap, indent=2, sort_keys=True) + "\n")
        model.save_config(tmp)
        meta = {
            "component": component,
            "class": type(model).__name__,
            "scheme": level.name,
            "level": level.name,
            "qtype": level.qtype,
            "source": str(pipeline_dir),
            "library": level.backend,
            "kept_float": kept,
            "note": "load with stunning.quantize.load_quantized(<the source pipeline>, <this folder>)",
        }
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2) + "\n")
    result = QuantizeResult(
        path=out_dir,
        component=component,
        scheme=level.name,
        quantized_modules=len(qmap),
        fp32_bytes=component_bytes(pipeline_dir, component),
        quantized_bytes=(out_dir / WEIGHTS_FILE).stat().st_size,
        fp32_memory_bytes=fp32_memory,
        quantized_memory_bytes=_state_bytes(state),
        backend=level.backend,
        kept_float=kept,
    )
    log.info("quantized %s to %s (%d modules, %s): %d -> %d bytes (%.2fx)", component, level.name,
             result.quantized_modules, level.backend, result.fp32_bytes, result.quantized_bytes, result.size_ratio)
    return result


def resolve_level_dir(quantized_dir: str | Path) -> Path:
    """A level folder as it is, or the level a ladder folder's index (``quantized.json``) names."""
    qdir = Path(quantized_dir)
    meta_path = qdir / META_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if "levels" in meta:  # the ladder index
            if not meta.get("load"):
                raise QuantizationError(f"{meta_path}: no quantization level ran; see reports/quantize.json")
            return qdir / meta["load"]
    return qdir


def load_quantized_denoiser(quantized_dir: str | Path, device: torch.device | str = "cpu"):
    """Rebuild a saved quantized denoiser (quanto's `requantize`, or bitsandbytes' prequantized
    NF4 weights); returns (model, component name)."""
    import diffusers
    import torch
    from safetensors.torch import load_file

    qdir = resolve_level_dir(quantized_dir)
    for name in (WEIGHTS_FILE, QMAP_FILE, META_FILE, "config.json"):
        if not (qdir / name).is_file():
            raise QuantizationError(f"{qdir / name} is missing: rebuild it with `dvc repro merge`.")
    meta = json.loads((qdir / META_FILE).read_text())
    cls = getattr(diffusers, meta["class"], None)
    if cls is None:
        raise QuantizationError(f"{qdir / META_FILE}: unknown diffusers class {meta['class']!r}")
    config = cls.load_config(str(qdir))
    qmap = json.loads((qdir / QMAP_FILE).read_text())
    state = load_file(str(qdir / WEIGHTS_FILE))
    if meta.get("library") == "bitsandbytes":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise QuantizationError(f"{qdir} holds NF4 weights: install bitsandbytes==0.50.2 to load them") from None
        model = cls.from_config(config)
        _load_nf4(model, state, qmap, device)
    else:
        from optimum.quanto import requantize

        if meta.get("level") and level_of(meta["level"]).bits == 4:
            from stunning.training.quantized import load_quanto_kernel

            load_quanto_kernel()
        with torch.device("meta"):
            model = cls.from_config(config)
        requantize(model, state, qmap, device=torch.device(device))
    model.eval()
    return model, meta["component"]


def load_quantized(pipeline_dir: str | Path, quantized_dir: str | Path, device: torch.device | str = "cpu"):
    """The pipeline at `pipeline_dir` with its denoiser replaced by the quantized one.

    The other components load in float32: the quantized weights dequantize into the
    activation dtype, and float32 keeps the comparison with the unquantized model about
    quantization alone. `quantized_dir`: a level folder, or the ladder folder (its chosen level).
    """
    import torch
    from diffusers import DiffusionPipeline

    from stunning.families import absent_components

    model, component = load_quantized_denoiser(quantized_dir, device)
    pipe = DiffusionPipeline.from_pretrained(
        str(pipeline_dir), local_files_only=True, dtype=torch.float32,
        **{**absent_components(Path(pipeline_dir)), component: model},
    )
    pipe.set_progress_bar_config(disable=True)
    for name, comp in pipe.components.items():
        if name != component and isinstance(comp, torch.nn.Module):
            comp.to(device)
    return pipe


# --------------------------------------------------------------------------- fidelity


def _arrays(images: Sequence[Image.Image]):
    import numpy as np

    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 for im in images])


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]; :data:`PSNR_IDENTICAL` when equal."""
    return PSNR_IDENTICAL if mse <= 10 ** (-PSNR_IDENTICAL / 10) else float(-10.0 * math.log10(mse))


def ssim(reference: Sequence[Image.Image], candidate: Sequence[Image.Image]) -> float:
    """Mean structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
    K1 0.01, K2 0.03, data range 1) over the RGB channels and paired images."""
    import torch

    a = torch.from_numpy(_arrays(reference)).permute(0, 3, 1, 2)
    b = torch.from_numpy(_arrays(candidate)).permute(0, 3, 1, 2)
    # 11x11 window; images smaller than that use the largest odd window that fits
    size, sigma = min(11, *(d - (1 - d % 2) for d in a.shape[2:])), 1.5
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(a.shape[1], 1, size, size).contiguous()

    def blur(t):
        return torch.nn.functional.conv2d(t, win, groups=a.shape[1])  # "valid": no padded borders

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def image_fidelity(reference: list[Image.Image], candidate: list[Image.Image]) -> dict[str, float]:
    """Pixel MSE, max abs difference (range [0, 1]), PSNR (dB) and SSIM of paired images."""
    import numpy as np

    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference images but {len(candidate)} candidates")
    a, b = _arrays(reference), _arrays(candidate)
    mse = float(((a - b) ** 2).mean())
    return {"mse": mse, "max_abs": float(np.abs(a - b).max()), "psnr": psnr(mse), "ssim": ssim(reference, candidate)}


# --------------------------------------------------------------------------- generation


@dataclass
class GenerationRun:
    images: list
    peak_memory_mb: float
    seconds_per_image: float


def _release(device: Any = None) -> None:
    """Free the previous pipeline before the next is measured (stunning.training.memory)."""
    from stunning.training.memory import free_memory

    free_memory(device)


def _draw(family: Any, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
          device: Any, load: Callable[[], Any] | None = None, batch: int = 8) -> tuple[Any, GenerationRun]:
    """(pipe, run): under one PeakMemory, optionally `load()` the pipe, then draw one untimed
    1-step warm-up, one timed single-image request (the latency a user sees) and the rest in
    batches (each image has its own seeded generator: the same images up to float order)."""
    from stunning.device import PeakMemory

    with PeakMemory(device) as pm:
        if load is not None:
            pipe = load()
        family.generate(pipe, [prompts[0]], [seeds[0]], 1, guidance)
        t0 = time.perf_counter()
        images = list(family.generate(pipe, [prompts[0]], [seeds[0]], steps, guidance))
        latency = time.perf_counter() - t0
        for i in range(1, len(prompts), batch):
            images.extend(family.generate(pipe, list(prompts[i:i + batch]), list(seeds[i:i + batch]), steps, guidance))
    return pipe, GenerationRun(images, pm.peak_mb, latency)


# --------------------------------------------------------------------------- the ladder


@dataclass
class LadderInputs:
    """What the ladder generates: the fixed prompts x seeds (fused model) and, per style, the
    adapter folder and its content-matched style set (:func:`stunning.validation.style_sets`)."""

    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance_scale: float
    adapters: dict[str, Path] = field(default_factory=dict)
    style_sets: dict[str, Any] = field(default_factory=dict)  # style -> validation.StyleSet


def _style_gain(images: Sequence[Image.Image], references: Any, base_distance: float) -> float:
    from stunning import metrics

    return metrics.style_gain(metrics.set_distance(metrics.features(images), references), base_distance)


def _variants(family: Any, pipeline_dir: Path, base_dir: Path, fused_name: str, inputs: LadderInputs,
              device: Any, load_fused: Callable[[], Any], load_base: Callable[[], Any]) -> dict[str, dict[str, Any]]:
    """Images, peak memory and latency of the fused model and of each adapter on the base."""
    pairs = [(p, int(s)) for p in inputs.prompts for s in inputs.seeds]
    args = (inputs.steps, inputs.guidance_scale, device)
    pipe, run = _draw(family, None, [p for p, _ in pairs], [s for _, s in pairs], *args, load=load_fused)
    out = {fused_name: {"kind": "fused", "run": run}}
    del pipe
    _release(device)
    pipe = None
    for style, folder in inputs.adapters.items():
        st = inputs.style_sets[style]

        def load(pipe=pipe, folder=folder, style=style):
            pipe = pipe if pipe is not None else load_base()
            pipe.load_lora_weights(str(folder), adapter_name=f"q_{style}")
            return pipe

        pipe, run = _draw(family, pipe, st.adapter_prompts, st.seeds, *args, load=load)
        pipe.unload_lora_weights()
        out[style] = {"kind": "adapter", "run": run}
    del pipe
    _release(device)
    return out


def measure_ladder(
    family: Any,
    fused_dir: str | Path,
    base_dir: str | Path,
    out_dir: str | Path,
    levels: Sequence[str],
    inputs: LadderInputs,
    fused_name: str,
    device: Any = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Quantize the fused and the base denoiser to each level (saved under ``out_dir/<level>``),
    reload each from disk and measure it against float32; returns ``{"reference", "levels",
    "images"}`` (images: the fused model's (images, seconds per image), per level and ``float32``)."""
    import torch

    from stunning import metrics

    device = torch.device(device)
    say = progress or (lambda msg: None)
    fused_dir, base_dir, out_dir = Path(fused_dir), Path(base_dir), Path(out_dir)

    say("float32 references")
    ref = _variants(family, fused_dir, base_dir, fused_name, inputs, device,
                    lambda: family.load_pipeline(fused_dir, device, torch.float32),
                    lambda: family.load_pipeline(base_dir, device, torch.float32))
    # The base's content-matched style sets: the denominator of every style gain (float32).
    refs, base_distance = {}, {}
    if inputs.adapters:
        pipe = family.load_pipeline(base_dir, device, torch.float32)
        for style, st in inputs.style_sets.items():
            if style not in inputs.adapters:
                continue
            refs[style] = metrics.features(st.references)
            _, run = _draw(family, pipe, st.base_prompts, st.seeds, inputs.steps, inputs.guidance_scale, device)
            base_distance[style] = metrics.set_distance(metrics.features(run.images), refs[style])
        del pipe
        _release(device)
    fused_bytes = None
    component = None
    reference = {
        "peak_memory_mb": round(ref[fused_name]["run"].peak_memory_mb, 2),
        "latency_s": round(ref[fused_name]["run"].seconds_per_image, 4),
    }
    images = {"float32": (ref[fused_name]["run"].images, ref[fused_name]["run"].seconds_per_image)}
    # Each adapter's float32 style gain: the figure every level's is compared with.
    gain_fp32 = {s: _style_gain(ref[s]["run"].images, refs[s], base_distance[s]) for s in inputs.adapters}
    results = []
    for name in levels:
        level = level_of(name)
        say(f"level {name}")
        entry: dict[str, Any] = {"level": name, "runs": False, "backend": level.backend, "reason": None,
                                 "denoiser_bytes": None, "size_ratio": None, "path": None, "variants": {}}
        try:
            fused_q = quantize_denoiser(fused_dir, family, out_dir / name, name)
            if inputs.adapters:
                quantize_denoiser(base_dir, family, out_dir / name / BASE_SUBDIR, name)
        except LevelUnavailable as exc:
            entry["reason"] = str(exc)
            log.warning("level %s cannot run here: %s", name, exc)
            results.append(entry)
            continue
        component = fused_q.component
        fused_bytes = fused_q.fp32_bytes
        entry.update(runs=True, denoiser_bytes=fused_q.quantized_bytes, size_ratio=round(fused_q.size_ratio, 6),
                     path=str(out_dir / name), quantized_modules=fused_q.quantized_modules,
                     kept_float=fused_q.kept_float)
        q = _variants(family, fused_dir, base_dir, fused_name, inputs, device,
                      lambda n=name: load_quantized(fused_dir, out_dir / n, device),
                      lambda n=name: load_quantized(base_dir, out_dir / n / BASE_SUBDIR, device))
        images[name] = (q[fused_name]["run"].images, q[fused_name]["run"].seconds_per_image)
        for vname, v in q.items():
            run, fp = v["run"], ref[vname]["run"]
            fid = image_fidelity(fp.images, run.images)
            row = {"kind": v["kind"], "peak_memory_mb": round(run.peak_memory_mb, 2),
                   "latency_s": round(run.seconds_per_image, 4), "psnr": round(fid["psnr"], 4),
                   "ssim": round(fid["ssim"], 6), "mse": fid["mse"], "max_abs": round(fid["max_abs"], 6)}
            if v["kind"] == "adapter":
                gain_fp = gain_fp32[vname]
                gain_q = _style_gain(run.images, refs[vname], base_distance[vname])
                row.update(style_gain=round(gain_q, 6), style_gain_fp32=round(gain_fp, 6),
                           style_gain_loss=round(gain_fp - gain_q, 6))
            entry["variants"][vname] = row
        results.append(entry)
    reference["denoiser_bytes"] = fused_bytes if fused_bytes is not None else _fp32_bytes(fused_dir)
    return {"reference": reference, "levels": results, "images": images, "component": component}


def _fp32_bytes(pipeline_dir: Path) -> int | None:
    for component in ("transformer", "unet"):
        if (pipeline_dir / component).is_dir():
            return component_bytes(pipeline_dir, component)
    return None


# --------------------------------------------------------------------------- the choice


def judge_level(entry: Mapping[str, Any], min_psnr: float, max_style_gain_loss: float,
                memory_budget_mb: float | None) -> list[str]:
    """Why a measured level breaks the budgets ([] when it passes)."""
    if not entry.get("runs"):
        return [f"does not run here: {entry.get('reason')}"]
    failures = []
    for name, v in sorted(entry.get("variants", {}).items()):
        p = v.get("psnr")
        if not isinstance(p, int | float) or not p >= min_psnr:
            failures.append(f"psnr {p} < {min_psnr:g} ({name})")
        loss = v.get("style_gain_loss")
        if v.get("kind") == "adapter" and (not isinstance(loss, int | float) or not loss <= max_style_gain_loss):
            failures.append(f"style gain loss {loss} > {max_style_gain_loss:g} ({name})")
        mem = v.get("peak_memory_mb")
        if memory_budget_mb is not None and (not isinstance(mem, int | float) or not mem <= memory_budget_mb):
            failures.append(f"peak memory {mem} MB > {memory_budget_mb:g} MB target ({name})")
    return failures


def choose_level(levels: Sequence[Mapping[str, Any]], min_psnr: float, max_style_gain_loss: float,
                 memory_budget_mb: float | None = None) -> tuple[str | None, str, list[dict[str, Any]]]:
    """The smallest level (fewest denoiser bytes; ties: higher worst PSNR) that passes every budget.

    Returns (chosen level or None, why in words, the levels with ``passes`` and ``failures``
    filled in). A level with any failure is never chosen."""
    judged = []
    for entry in levels:
        failures = judge_level(entry, min_psnr, max_style_gain_loss, memory_budget_mb)
        judged.append({**entry, "passes": not failures, "failures": failures})
    passing = [e for e in judged if e["passes"]]

    def worst_psnr(e: Mapping[str, Any]) -> float:
        return min((v["psnr"] for v in e["variants"].values()), default=math.inf)

    rules = (f"PSNR >= {min_psnr:g} dB, style gain loss <= {max_style_gain_loss:g}"
             + (f", peak memory <= {memory_budget_mb:.0f} MB" if memory_budget_mb is not None else ""))
    rejected = "; ".join(f"{e['level']}: {', '.join(e['failures'])}" for e in judged if not e["passes"])
    if not passing:
        return None, f"no level passes the budgets ({rules}): {rejected or 'no level was tried'}", judged
    best = min(passing, key=lambda e: (e["denoiser_bytes"], -worst_psnr(e)))
    smaller = [e for e in judged if not e["passes"] and (e.get("denoiser_bytes") or 0) < best["denoiser_bytes"]]
    why = (f"{best['level']} is the smallest level that passes ({best['denoiser_bytes']} bytes, "
           f"{best['size_ratio']:.3f}x float32; worst PSNR {worst_psnr(best):.1f} dB; {rules})")
    if smaller:
        why += "; smaller levels failed: " + "; ".join(f"{e['level']}: {', '.join(e['failures'])}" for e in smaller)
    elif rejected:
        why += f"; also failed: {rejected}"
    return best["level"], why, judged


def memory_target(target: str, research_report: Mapping[str, Any] | None, research_path: str = "reports/research.json"
                  ) -> dict[str, Any]:
    """The memory budget of `merge.target_device`: the research plan's, or a named Apple chip's."""
    if target in APPLE_TARGETS:
        gb = int(target.split("-")[1].removesuffix("gb"))
        return {"name": target, "memory_budget_mb": round(APPLE_TARGETS[target], 1),
                "source": f"Apple {gb} GB unified memory: about 2/3 is Metal's recommended working set"}
    if target != "plan":
        raise QuantizationError(f"merge.target_device={target!r}: use plan or one of {sorted(APPLE_TARGETS)}")
    if research_report is None or not isinstance(research_report.get("budget_gb"), int | float):
        raise QuantizationError(
            f"merge.target_device=plan needs the research plan's memory budget: {research_path} is missing or has "
            "no budget_gb. Run `dvc repro research`, or name a device (merge.target_device: apple-16gb)."
        )
    return {"name": "plan", "memory_budget_mb": round(float(research_report["budget_gb"]) * 1024, 1),
            "source": f"{research_path} budget_gb ({research_report.get('budget_source', 'research plan')})"}
