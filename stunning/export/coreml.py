"""Core ML export of a model folder's parts, palettized at several bit widths, checked per layer.

:func:`export_coreml` loads a diffusers folder, captures the denoiser's call at the configured
resolution for `batch` images (:mod:`stunning.export.signature`), and takes every deployable part
(:mod:`stunning.export.components`: denoiser, VAE decoder and encoder, text encoders). Each part's
``torch.export`` graph is first checked against the diffusers computation it replaces
(``graph_check``), converted once with coremltools to an ML program (``<part>.mlpackage``), then
palettized (``coremltools.optimize.coreml.palettize_weights``, one look-up table per tensor) at each
of `nbits` from that converted program into ``<part>-<n>bit.mlpackage``; every palettized weight
is read back (decompressed) and compared with the torch parameter of the same layer.

Why ``torch.export`` and not ``torch.jit.trace``: with coremltools 9.0, torch 2.13 and numpy 2,
converting a traced diffusers denoiser (the UNet and the SD3 transformer alike) fails in the
TorchScript frontend with ``TypeError: only 0-dimensional arrays can be converted to Python
scalars`` (an int cast of a shape); the ``torch.export`` (ATen dialect) frontend converts them.

Predicting needs macOS (the Core ML framework): on other systems each part's report says
``prediction.skipped`` with the reason instead of an error; on macOS it holds the max abs error
of the float package against the diffusers computation on the part's example (untested here).

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
from typing import Any

from stunning.export import ExportError
from stunning.export.components import Component, export_program, graph_check
from stunning.io import atomic_dir, write_json

log = logging.getLogger(__name__)

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
    components: tuple[str, ...] | list[str] | None = None,
    resolution: int | None = None,
) -> dict[str, Any]:
    """Convert and palettize the parts of `model_dir` (all of :func:`~stunning.export.components.components`,
    or those named in `components`) into `out_dir`; return (and save) the report.

    `mode`: ``kmeans`` (the better look-up table, slow: minutes per bit width on a small CPU) or
    ``uniform`` (evenly spaced levels, seconds). `resolution`: the fixed image size (None: the model's).
    """
    import torch

    from stunning.export.components import capture_at, check_family
    from stunning.export.components import components as make_components
    from stunning.families import get_family
    from stunning.model_source import detect_family

    check_options(nbits, mode, precision)
    ct = _coremltools()
    model_dir = Path(model_dir)
    fam = get_family(family or detect_family(model_dir))
    check_family(fam.name)
    t0 = time.perf_counter()
    pipe = fam.load_pipeline(model_dir, torch.device("cpu"), torch.float32)
    signature = capture_at(fam, pipe, resolution=resolution, batch=batch, guidance_scale=guidance_scale)
    parts = make_components(fam, pipe, signature, batch=batch, which=components)
    load_s = time.perf_counter() - t0
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        report = export_components(ct, parts, tmp, nbits=nbits, mode=mode, precision=precision)
        report = {
            "format": "coreml", "model_dir": str(model_dir), "family": fam.name,
            "resolution": resolution or fam.resolution(pipe), "images_per_call": batch,
            "guidance_scale": guidance_scale, **report,
        }
        report["seconds"]["load_and_capture"] = round(load_s, 3)
        write_json(tmp / REPORT_FILE, report)
    report["path"] = str(out_dir)
    return report


def check_options(nbits, mode: str, precision: str) -> None:
    """Refuse a palettization mode, precision or bit width Core ML does not have (before any work)."""
    if mode not in PALETTIZE_MODES:
        raise ExportError(f"mode={mode!r}: choose one of {list(PALETTIZE_MODES)}")
    if precision not in PRECISIONS:
        raise ExportError(f"precision={precision!r}: choose one of {list(PRECISIONS)}")
    bad = [n for n in nbits if n not in (1, 2, 3, 4, 6, 8)]
    if bad:
        raise ExportError(f"nbits={bad}: Core ML palettization takes 1, 2, 3, 4, 6 or 8 bits")


def export_components(ct, parts: list[Component], out_dir: Path, *, nbits=DEFAULT_NBITS, mode: str = "kmeans",
                      precision: str = "float16", deployment_target: str = DEPLOYMENT_TARGET) -> dict[str, Any]:
    """Each part to ``<name>.mlpackage`` (float) and ``<name>-<n>bit.mlpackage`` under `out_dir`: the
    report fragment (per part: names/shapes/types, the exported graph vs diffusers, per-layer weight
    errors of every package, the macOS prediction check or why it was skipped)."""
    import torch

    seconds: dict[str, float] = {}
    done: dict[str, Any] = {}
    for part in parts:
        t1 = time.perf_counter()
        program = export_program(part)
        check = graph_check(part, program)
        mlmodel = convert_program(ct, program, part, precision, deployment_target)
        float_name = f"{part.name}.mlpackage"
        mlmodel.save(str(out_dir / float_name))
        reference = {k.removeprefix(part.strip): v.detach().float().numpy() for k, v in part.module.named_parameters()}
        prefix = "p_" + part.strip.replace(".", "_")
        packages = {precision: {"package": float_name, "bits": 16 if precision == "float16" else 32,
                                "bytes": tree_bytes(out_dir / float_name),
                                **weight_errors(_mil_weights(mlmodel), reference, prefix)}}
        seconds[f"{part.name}_convert"] = round(time.perf_counter() - t1, 3)
        for n in nbits:
            t2 = time.perf_counter()
            name = f"{part.name}-{n}bit.mlpackage"
            pal, pal_weights = palettize(ct, mlmodel, n, mode)
            pal.save(str(out_dir / name))
            errors = weight_errors(pal_weights, reference, prefix)
            packages[f"{n}bit"] = {"package": name, "bits": n, "bytes": tree_bytes(out_dir / name), **errors}
            seconds[f"{part.name}_palettize_{n}bit"] = round(time.perf_counter() - t2, 3)
        done[part.name] = {
            **describe(mlmodel), "graph": "torch.export", "graph_check": check, "notes": part.notes,
            "packages": packages, "prediction": predict_check(mlmodel, part),
        }
    return {
        "coremltools": ct.__version__, "torch": torch.__version__, "deployment_target": deployment_target,
        "precision": precision, "palettization": {"mode": mode, "granularity": "per_tensor", "nbits": list(nbits)},
        "components": done, "seconds": seconds,
    }


def convert_program(ct, program, part: Component, precision: str = "float16",
                    deployment_target: str = DEPLOYMENT_TARGET):
    """The Core ML ML program of an exported part, inputs and outputs under the part's names."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mlmodel = ct.convert(
                program,
                outputs=[ct.TensorType(name=o.name) for o in part.outputs],
                convert_to="mlprogram",
                minimum_deployment_target=getattr(ct.target, deployment_target),
                compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
                skip_model_load=True,
            )
        except Exception as exc:  # noqa: BLE001 - a converter failure on a graph it does not support
            raise ExportError(
                f"coremltools {ct.__version__} could not convert the {part.name} "
                f"(torch {torch.__version__}): {type(exc).__name__}: {exc}"
            ) from exc
    spec = mlmodel.get_spec()
    current = [i.name for i in spec.description.input]
    for old, new in zip(current, [i.name for i in part.inputs], strict=True):
        if old != new:
            ct.utils.rename_feature(spec, old, new)
    return ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)


def palettize(ct, mlmodel, nbits: int, mode: str = "kmeans"):
    """(`mlmodel` with every weight of 2048+ elements palettized to `nbits`, one table per tensor;
    its weights by name as :func:`_mil_weights` returns them, decompressed).

    Applies coremltools' ``palettize_weights`` graph pass to the package's MIL program and writes
    the program back without re-running the default optimisation pipeline (the float program was
    optimised at conversion): what ``coremltools.optimize.coreml.palettize_weights`` does, minus
    that second pipeline, which took ~90 % of its time on the micro model.
    """
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig
    from coremltools.optimize.coreml._quantization_passes import palettize_weights as palettize_pass

    op = OpPalettizerConfig(mode=mode, nbits=nbits, granularity="per_tensor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = _program(mlmodel)
        palettize_pass(config=OptimizationConfig(global_config=op)).apply(prog)
        weights = _program_weights(prog)
        spec = mlmodel.get_spec()
        out = mil_convert(prog, convert_to="mlprogram", convert_from="milinternal",
                          specification_version=spec.specificationVersion, compute_units=mlmodel.compute_unit,
                          model_description=spec.description, skip_model_load=True,
                          pass_pipeline=ct.PassPipeline.EMPTY)
    return out, weights


def _program(mlmodel):
    """The pymil program of an ML program package (a fresh copy: graph passes mutate it)."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.models import utils as model_utils

    return model_utils._convert_model_spec_to_pymil_prog(mlmodel, mlmodel.get_spec().specificationVersion,
                                                          milproto_load)


def _mil_weights(mlmodel) -> dict[str, Any]:
    """Every constant weight of the package's program by name: (values, unique values, palettized?)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _program_weights(_program(mlmodel))


def _program_weights(prog) -> dict[str, Any]:
    """name (without the ``_palettized``/``_to_fp16`` suffixes) -> (dense values, unique values,
    palettized?) for every const and look-up-table op of `prog`; palettized ones decompressed."""
    import numpy as np

    out: dict[str, Any] = {}

    def walk(block) -> None:
        for op in block.operations:
            for inner in op.blocks:
                walk(inner)
            if op.op_type == "constexpr_lut_to_dense":
                val, palettized = op.materialized_val_inference(), True
            elif op.op_type == "const" and op.outputs:
                val, palettized = op.outputs[0].val, False
            else:
                continue
            if isinstance(val, np.ndarray) and val.size > 1:
                key = op.name.removesuffix("_palettized").removesuffix("_to_fp16")
                out[key] = (val, int(np.unique(val).size), palettized)

    for f in prog.functions.values():
        walk(f)
    return out


def spec_io(spec) -> dict[str, list[dict[str, Any]]]:
    """Names, shapes and types of the inputs and outputs of a package's spec (readable off macOS)."""

    def io(features) -> list[dict[str, Any]]:
        out = []
        for f in features:
            arr = f.type.multiArrayType
            dtype = type(arr).ArrayDataType.Name(arr.dataType).lower()
            out.append({"name": f.name, "shape": [int(d) for d in arr.shape], "dtype": dtype})
        return out

    return {"inputs": io(spec.description.input), "outputs": io(spec.description.output)}


def describe(mlmodel) -> dict[str, Any]:
    """Names, shapes and types of the package's inputs and outputs, and its spec version."""
    spec = mlmodel.get_spec()
    return {**spec_io(spec), "spec_version": int(spec.specificationVersion)}


def weight_errors(mil: dict[str, Any], reference: dict[str, Any], prefix: str = "p_denoiser_") -> dict[str, Any]:
    """Per layer (torch parameter name): max abs and relative RMS error of the package's weight, and
    a summary. torch.export names a parameter ``p_<wrapper attribute>_<path with _>`` (`prefix` +
    the path); what the converter folded away (no constant of that name) is counted as unmatched."""
    import numpy as np

    layers = {}
    for name, w in reference.items():
        entry = mil.get(prefix + name.replace(".", "_"))
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


def predict_check(mlmodel, part: Component) -> dict[str, Any]:
    """Max abs error of the package against the diffusers computation on the part's example (macOS only)."""
    if sys.platform != "darwin":
        return {"skipped": PREDICTION_SKIPPED.format(platform=sys.platform)}
    import numpy as np
    import torch

    ct = _coremltools()
    model = ct.models.MLModel(mlmodel.get_spec(), weights_dir=mlmodel.weights_dir)
    feed = {s.name: t.numpy().astype(s.dtype) for s, t in zip(part.inputs, part.example, strict=True)}
    with torch.no_grad():
        refs = part.reference(*part.example)
    got = model.predict(feed)
    errors = {o.name: float(np.abs(got[o.name] - r.numpy()).max()) for o, r in zip(part.outputs, refs, strict=True)}
    return {"max_abs_error": max(errors.values()), "per_output": errors,
            "reference_max_abs": max(float(r.abs().max()) for r in refs)}


def tree_bytes(path: Path) -> int:
    """Bytes of every file under `path` (a package is a folder)."""
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)
