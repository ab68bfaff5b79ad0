"""Core ML export of a model folder's denoiser, palettized at several bit widths, checked per layer.

:func:`export_coreml` captures the denoiser's call like the ONNX export does
(:mod:`stunning.export.signature`: the model's resolution, `batch` images, fixed shapes), converts
the ``torch.export`` graph of it with coremltools to an ML program (``denoiser.mlpackage``), then
palettizes the weights (``coremltools.optimize.coreml.palettize_weights``, one look-up table per
tensor) at each of `nbits` into ``denoiser-<n>bit.mlpackage``, reads every palettized weight back
(decompressed) and compares it with the torch module's weight of the same layer.

Why ``torch.export`` and not ``torch.jit.trace``: with coremltools 9.0, torch 2.13 and numpy 2,
converting a traced diffusers denoiser (the UNet and the SD3 transformer alike) fails in the
TorchScript frontend with ``TypeError: only 0-dimensional arrays can be converted to Python
scalars`` (an int cast of a shape); the ``torch.export`` (ATen dialect) frontend converts both.

Predicting needs macOS (the Core ML framework): on other systems the report says
``prediction.skipped`` with the reason instead of an error; on macOS it holds the max abs error
of the float package against the torch module on the sampler's first call (untested here).

Weights on disk: the float package stores float16 by default (``precision="float16"``, what the
Neural Engine runs); its own per-layer error against torch is reported too, so the palettization
error can be told apart from the float16 rounding.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stunning.export import ExportError
from stunning.export.signature import OUTPUT_NAME, DenoiserSignature, capture, flat_denoiser
from stunning.io import atomic_dir, write_json

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PACKAGE = "denoiser.mlpackage"
REPORT_FILE = "export.json"
PALETTIZE_MODES = ("kmeans", "uniform")
PRECISIONS = ("float16", "float32")
DEFAULT_NBITS = (8, 6, 4)
DEPLOYMENT_TARGET = "macOS14"  # ML program with per-tensor palettization (iOS 17 / macOS 14 and later)
PREDICTION_SKIPPED = "Core ML prediction needs macOS (coremltools on {platform} converts and compresses only)"


def _coremltools():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("coremltools").setLevel(logging.ERROR)
            import coremltools
    except ImportError:
        raise ExportError(
            "coremltools is not installed: `pip install coremltools==9.0` (pinned in constraints.txt)"
        ) from None
    return coremltools


def export_coreml(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    family: str | None = None,
    batch: int = 1,
    guidance_scale: float = 4.0,
    nbits: tuple[int, ...] | list[int] = DEFAULT_NBITS,
    mode: str = "kmeans",
    precision: str = "float16",
) -> dict[str, Any]:
    """Convert and palettize the denoiser of `model_dir` into `out_dir`; return (and save) the report.

    `mode`: ``kmeans`` (the better look-up table, slow: minutes per bit width on a small CPU) or
    ``uniform`` (evenly spaced levels, seconds).
    """
    import torch

    from stunning.families import get_family
    from stunning.model_source import detect_family

    if mode not in PALETTIZE_MODES:
        raise ExportError(f"mode={mode!r}: choose one of {list(PALETTIZE_MODES)}")
    if precision not in PRECISIONS:
        raise ExportError(f"precision={precision!r}: choose one of {list(PRECISIONS)}")
    bad = [n for n in nbits if n not in (1, 2, 3, 4, 6, 8)]
    if bad:
        raise ExportError(f"nbits={bad}: Core ML palettization takes 1, 2, 3, 4, 6 or 8 bits")
    ct = _coremltools()
    model_dir = Path(model_dir)
    fam = get_family(family or detect_family(model_dir))
    t0 = time.perf_counter()
    pipe = fam.load_pipeline(model_dir, torch.device("cpu"), torch.float32)
    module = fam.denoiser(pipe).eval()
    signature = capture(fam, pipe, batch=batch, guidance_scale=guidance_scale)
    load_s = time.perf_counter() - t0
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        t1 = time.perf_counter()
        mlmodel = convert(module, signature, precision)
        mlmodel.save(str(tmp / PACKAGE))
        convert_s = time.perf_counter() - t1
        reference = {k: v.detach().float().numpy() for k, v in module.named_parameters()}
        weights = {
            "float": {"package": PACKAGE, "bytes": _tree_bytes(tmp / PACKAGE),
                      **weight_errors(_mil_weights(ct, mlmodel), reference)},
        }
        seconds = {"load_and_capture": round(load_s, 3), "convert": round(convert_s, 3)}
        for n in nbits:
            t2 = time.perf_counter()
            name = f"denoiser-{n}bit.mlpackage"
            pal = palettize(ct, mlmodel, n, mode)
            pal.save(str(tmp / name))
            errors = weight_errors(_mil_weights(ct, pal, decompress=True), reference)
            weights[f"{n}bit"] = {"package": name, "bytes": _tree_bytes(tmp / name), **errors}
            seconds[f"palettize_{n}bit"] = round(time.perf_counter() - t2, 3)
        report: dict[str, Any] = {
            "format": "coreml",
            "model_dir": str(model_dir),
            "family": fam.name,
            "component": signature.component,
            "graph": "torch.export",
            "coremltools": ct.__version__,
            "torch": torch.__version__,
            "deployment_target": DEPLOYMENT_TARGET,
            "precision": precision,
            "palettization": {"mode": mode, "granularity": "per_tensor", "nbits": list(nbits)},
            "resolution": fam.resolution(pipe),
            "images_per_call": batch,
            "guidance_scale": guidance_scale,
            **describe(mlmodel),
            "weights": weights,
            "prediction": predict_check(mlmodel, module, signature),
            "seconds": seconds,
        }
        write_json(tmp / REPORT_FILE, report)
    report["path"] = str(out_dir / PACKAGE)
    return report


def convert(module: torch.nn.Module, signature: DenoiserSignature, precision: str = "float16"):
    """The Core ML ML program of the denoiser's fixed-shape call, inputs/outputs named as in ONNX."""
    import torch

    ct = _coremltools()
    flat = flat_denoiser(module, signature)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(flat, signature.example_tuple()).run_decompositions({})
        try:
            mlmodel = ct.convert(
                program,
                outputs=[ct.TensorType(name=OUTPUT_NAME)],
                convert_to="mlprogram",
                minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
                compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
                skip_model_load=True,
            )
        except Exception as exc:  # noqa: BLE001 - a converter failure on a graph it does not support
            raise ExportError(
                f"coremltools {ct.__version__} could not convert the {signature.component} "
                f"(torch {torch.__version__}): {type(exc).__name__}: {exc}"
            ) from exc
    spec = mlmodel.get_spec()
    current = [i.name for i in spec.description.input]
    for old, new in zip(current, signature.input_names, strict=True):
        if old != new:
            ct.utils.rename_feature(spec, old, new)
    return ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)


def palettize(ct, mlmodel, nbits: int, mode: str = "kmeans"):
    """`mlmodel` with every weight of 2048+ elements palettized to `nbits` (one table per tensor)."""
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    op = OpPalettizerConfig(mode=mode, nbits=nbits, granularity="per_tensor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return palettize_weights(mlmodel, OptimizationConfig(global_config=op))


def describe(mlmodel) -> dict[str, Any]:
    """Names, shapes and types of the package's inputs and outputs (from its spec)."""
    spec = mlmodel.get_spec()

    def io(features) -> list[dict[str, Any]]:
        out = []
        for f in features:
            arr = f.type.multiArrayType
            dtype = type(arr).ArrayDataType.Name(arr.dataType).lower()
            out.append({"name": f.name, "shape": [int(d) for d in arr.shape], "dtype": dtype})
        return out

    return {"inputs": io(spec.description.input), "outputs": io(spec.description.output),
            "spec_version": int(spec.specificationVersion)}


def _mil_weights(ct, mlmodel, decompress: bool = False) -> dict[str, Any]:
    """Every constant weight of the program by name (palettized ones decompressed back to dense)."""
    from coremltools.optimize.coreml import decompress_weights, get_weights_metadata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = decompress_weights(mlmodel) if decompress else mlmodel
        meta = get_weights_metadata(model, weight_threshold=0)
    return {name.removesuffix("_palettized").removesuffix("_to_fp16"): (m.val, m.unique_values,
                                                                        name.endswith("_palettized"))
            for name, m in meta.items()}


def weight_errors(mil: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Per layer (torch parameter name): max abs and relative RMS error of the package's weight, and
    a summary. torch.export names a parameter ``p_denoiser_<path with _>``; what the converter folded
    away (no constant of that name) is counted as unmatched."""
    import numpy as np

    layers = {}
    for name, w in reference.items():
        entry = mil.get("p_denoiser_" + name.replace(".", "_"))
        if entry is None or np.shape(entry[0]) != w.shape:
            continue
        val, unique, palettized = entry
        diff = np.asarray(val, dtype=np.float64) - w
        norm = float(np.sqrt((w.astype(np.float64) ** 2).mean())) or 1.0
        layers[name] = {
            "shape": list(w.shape),
            "palettized": bool(palettized),
            "unique_values": int(unique),
            "max_abs_error": float(np.abs(diff).max()),
            "rel_rms_error": float(np.sqrt((diff**2).mean()) / norm),
        }
    palettized = [v["rel_rms_error"] for v in layers.values() if v["palettized"]]
    # The summary covers the palettized layers (all layers for the unpalettized package).
    pal = palettized or [v["rel_rms_error"] for v in layers.values()]
    return {
        "layers": layers,
        "matched": len(layers),
        "unmatched": len(reference) - len(layers),
        "palettized_layers": len(palettized),
        "max_abs_error": max((v["max_abs_error"] for v in layers.values()), default=None),
        "rel_rms_error_mean": float(np.mean(pal)) if pal else None,
        "rel_rms_error_max": max(pal) if pal else None,
    }


def predict_check(mlmodel, module: torch.nn.Module, signature: DenoiserSignature) -> dict[str, Any]:
    """Max abs error of the package against torch on the sampler's first call (macOS only)."""
    if sys.platform != "darwin":
        return {"skipped": PREDICTION_SKIPPED.format(platform=sys.platform)}
    import numpy as np
    import torch

    ct = _coremltools()
    model = ct.models.MLModel(mlmodel.get_spec(), weights_dir=mlmodel.weights_dir)
    feed = {s.name: signature.example[s.name].numpy().astype(s.dtype) for s in signature.inputs}
    with torch.no_grad():
        ref = flat_denoiser(module, signature)(*signature.example_tuple()).numpy()
    got = model.predict(feed)[OUTPUT_NAME]
    return {"max_abs_error": float(np.abs(got - ref).max()), "reference_max_abs": float(np.abs(ref).max())}


def _tree_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)
