"""ONNX export of a model folder's denoiser, checked numerically with ONNX Runtime.

:func:`export_onnx` loads a diffusers folder (a base, or the fused model of
:func:`stunning.blend.fuse`), captures the denoiser's call at the model's resolution for `batch`
images (:mod:`stunning.export.signature`), exports it with fixed shapes to ``denoiser.onnx``, and
(unless ``verify=False``) checks it:

- ``max_abs_error``: the ONNX graph against the torch module on the same inputs (seeded random
  latents/conditioning at a random timestep, and the sampler's real first call);
- ``images``: images drawn through the *same* sampler, prompts and seeds with the ONNX denoiser
  swapped in (:func:`onnx_denoiser`) against the torch pipeline, PSNR per image (None: identical).

Exporter: ``dynamo`` (``torch.onnx.export(..., dynamo=True)``: torch.export + onnxscript), the
default, or ``torchscript`` (the legacy tracer). Both give ~1e-6 errors on sd3 and sd-unet with
torch 2.13; dynamo is the default because it is torch's maintained exporter (the TorchScript one
is deprecated since torch 2.9 and warns), its graph is the same ``torch.export`` graph the Core ML
converter takes, and it records no data-dependent Python branches as constants (the tracer warns
about SD3's ``pos_embed_max_size`` checks). The TorchScript exporter is about 3x faster to run.

Weights go to ``denoiser.onnx.data`` (ONNX external data) when they exceed
:data:`EXTERNAL_DATA_BYTES` (protobuf caps one file at 2 GiB) or when asked.

The output folder (written atomically) holds ``denoiser.onnx`` [+ ``.data``] and ``export.json``,
the report.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stunning.export import ExportError
from stunning.export.signature import (
    OUTPUT_NAME,
    TIMESTEP,
    DenoiserSignature,
    call_arguments,
    flat_denoiser,
)
from stunning.io import atomic_dir, write_json

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ONNX_FILE = "denoiser.onnx"
REPORT_FILE = "export.json"
EXPORTERS = ("dynamo", "torchscript")
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to an external data file
TORCHSCRIPT_OPSET = 17
DEFAULT_PROMPTS = ("a red dress on a white background", "a blue hat on a grey background, on the left")
DEFAULT_SEEDS = (0, 1)


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    family: str | None = None,
    batch: int = 1,
    guidance_scale: float = 4.0,
    exporter: str = "dynamo",
    external_data: bool | None = None,
    verify: bool = True,
    prompts: list[str] | tuple[str, ...] = DEFAULT_PROMPTS,
    seeds: list[int] | tuple[int, ...] = DEFAULT_SEEDS,
    steps: int = 8,
    resolution: int | None = None,
) -> dict[str, Any]:
    """Export the denoiser of `model_dir` to `out_dir`/denoiser.onnx and return (and save) the report.

    `family` defaults to the one that wrote the folder's model_index.json; `batch` images per call
    at `guidance_scale` fix the shapes (with guidance > 1 an SD-style sampler doubles the batch).
    """
    import torch

    from stunning.export.components import at_resolution, capture_at
    from stunning.families import get_family
    from stunning.model_source import detect_family

    if exporter not in EXPORTERS:
        raise ExportError(f"exporter={exporter!r}: choose one of {list(EXPORTERS)}")
    model_dir = Path(model_dir)
    fam = get_family(family or detect_family(model_dir))
    t0 = time.perf_counter()
    pipe = fam.load_pipeline(model_dir, torch.device("cpu"), torch.float32)
    signature = capture_at(fam, pipe, resolution=resolution, batch=batch, guidance_scale=guidance_scale)
    load_s = time.perf_counter() - t0
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        report = export_loaded(at_resolution(fam, resolution), pipe, signature, tmp, exporter=exporter, external_data=external_data,
                               verify=verify, prompts=prompts, seeds=seeds, steps=steps, guidance_scale=guidance_scale)
        report = {"model_dir": str(model_dir), **report, "resolution": resolution or fam.resolution(pipe),
                  "images_per_call": batch}
        report["seconds"]["load_and_capture"] = round(load_s, 3)
        write_json(tmp / REPORT_FILE, report)
    report["path"] = str(out_dir / ONNX_FILE)
    log.info("exported the %s %s to %s (%.1f MB, max abs error %s)", fam.name, signature.component,
             report["path"], report["bytes"] / 1e6, report.get("max_abs_error"))
    return report


def export_loaded(fam: Any, pipe: Any, signature: DenoiserSignature, out_dir: Path, *, exporter: str = "dynamo",
                  external_data: bool | None = None, verify: bool = True,
                  prompts: list[str] | tuple[str, ...] = DEFAULT_PROMPTS,
                  seeds: list[int] | tuple[int, ...] = DEFAULT_SEEDS, steps: int = 8,
                  guidance_scale: float = 4.0) -> dict[str, Any]:
    """Export the denoiser of a loaded pipeline to `out_dir`/denoiser.onnx (and check it unless
    ``verify=False``, drawing at the family's resolution as `fam` reports it); the report fragment."""
    import torch

    if exporter not in EXPORTERS:
        raise ExportError(f"exporter={exporter!r}: choose one of {list(EXPORTERS)}")
    module = fam.denoiser(pipe).eval()
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = n_bytes > EXTERNAL_DATA_BYTES if external_data is None else bool(external_data)
    t1 = time.perf_counter()
    _export(module, signature, out_dir / ONNX_FILE, exporter, external)
    report: dict[str, Any] = {
        "format": "onnx",
        "family": fam.name,
        "component": signature.component,
        "exporter": exporter,
        "torch": torch.__version__,
        "guidance_scale": guidance_scale,
        **describe(out_dir / ONNX_FILE),
        "parameters": sum(p.numel() for p in module.parameters()),
        "seconds": {"export": round(time.perf_counter() - t1, 3)},
    }
    if verify:
        t2 = time.perf_counter()
        report.update(check_onnx(out_dir / ONNX_FILE, fam, pipe, signature, prompts, seeds, steps, guidance_scale))
        report["seconds"]["verify"] = round(time.perf_counter() - t2, 3)
    return report


def _export(module: torch.nn.Module, signature: DenoiserSignature, path: Path, exporter: str, external: bool) -> None:
    import warnings

    import torch

    flat = flat_denoiser(module, signature)
    args = signature.example_tuple()
    common = dict(input_names=signature.input_names, output_names=[OUTPUT_NAME], verbose=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's TracerWarnings and the exporters' deprecation notes
        if exporter == "dynamo":
            torch.onnx.export(flat, args, str(path), dynamo=True, external_data=external, optimize=True, **common)
        else:
            torch.onnx.export(flat, args, str(path), dynamo=False, opset_version=TORCHSCRIPT_OPSET, **common)
            if external:
                import onnx

                model = onnx.load(str(path))
                onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=path.name + ".data")
    import onnx

    onnx.checker.check_model(str(path))


def describe(path: str | Path) -> dict[str, Any]:
    """Names, shapes, dtypes of the graph's inputs/outputs, opset and size on disk (data file included)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)

    def io(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
            out.append({"name": v.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name})
        return out

    files = [path] + sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name + "."))
    return {
        "inputs": io(model.graph.input),
        "outputs": io(model.graph.output),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "files": [p.name for p in files],
        "external_data": len(files) > 1,
        "bytes": sum(p.stat().st_size for p in files),
    }


def session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session for `path` (`threads`: intra-op threads, default torch's count)."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_session(sess, signature: DenoiserSignature, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ONNX denoiser's output for named tensors of any batch: split into the exported batch, the
    last chunk padded by repeating its final row, and joined again."""
    import numpy as np
    import torch

    batched = [s for s in signature.inputs if s.batched]
    n = int(inputs[batched[0].name].shape[0]) if batched else signature.batch
    b = signature.batch
    outs = []
    for start in range(0, n, b):
        feed = {}
        for spec in signature.inputs:
            t = inputs[spec.name]
            if spec.batched:
                t = t[start:start + b]
                if t.shape[0] < b:
                    t = torch.cat([t, t[-1:].expand(b - t.shape[0], *t.shape[1:])])
            feed[spec.name] = np.ascontiguousarray(t.detach().cpu().numpy().astype(spec.dtype, copy=False))
        outs.append(torch.from_numpy(sess.run([OUTPUT_NAME], feed)[0]))
    return torch.cat(outs)[:n]


class OnnxDenoiser:
    """A callable with the torch denoiser's signature that runs the ONNX graph instead.

    :func:`onnx_denoiser` installs it as the denoiser's ``forward``: the pipeline keeps its
    module (config, dtype, device attributes) but every call goes through ONNX Runtime.
    """

    def __init__(self, module: torch.nn.Module, sess, signature: DenoiserSignature) -> None:
        self.module, self.session, self.signature = module, sess, signature
        self.calls = 0

    def __call__(self, *args, **kwargs):
        import types

        inputs = self.signature.flatten(self.module, args, kwargs)
        sample = next(t for t in inputs.values() if t.is_floating_point())
        out = run_session(self.session, self.signature, inputs).to(device=sample.device, dtype=sample.dtype)
        self.calls += 1
        return types.SimpleNamespace(sample=out) if call_arguments(self.module, args, kwargs).get("return_dict", True) \
            else (out,)


@contextlib.contextmanager
def onnx_denoiser(family: Any, pipe: Any, sess, signature: DenoiserSignature) -> Iterator[OnnxDenoiser]:
    """Within the block, `pipe`'s denoiser runs the ONNX session (`family.generate` works unchanged)."""
    module = family.denoiser(pipe)
    runner = OnnxDenoiser(module, sess, signature)
    module.forward = runner
    try:
        yield runner
    finally:
        del module.forward


def check_onnx(
    path: str | Path,
    family: Any,
    pipe: Any,
    signature: DenoiserSignature,
    prompts: list[str] | tuple[str, ...] = DEFAULT_PROMPTS,
    seeds: list[int] | tuple[int, ...] = DEFAULT_SEEDS,
    steps: int = 8,
    guidance_scale: float = 4.0,
) -> dict[str, Any]:
    """The numerical checks of the module docstring, as a report fragment."""
    import torch

    sess = session(path)
    module = family.denoiser(pipe)
    flat = flat_denoiser(module, signature)
    errors = {}
    for label, inputs in (("random", random_inputs(signature, seed=0)), ("sampler_call", dict(signature.example))):
        with torch.no_grad():
            ref = flat(*(inputs[s.name] for s in signature.inputs))
        got = run_session(sess, signature, inputs)
        errors[label] = {"max_abs_error": float((got - ref).abs().max()), "reference_max_abs": float(ref.abs().max())}
    pairs = [(p, s) for p in prompts for s in seeds]
    ps, ss = [p for p, _ in pairs], [int(s) for _, s in pairs]
    t0 = time.perf_counter()
    reference = family.generate(pipe, ps, ss, steps, guidance_scale)
    torch_s = time.perf_counter() - t0
    with onnx_denoiser(family, pipe, sess, signature) as runner:
        t1 = time.perf_counter()
        candidate = family.generate(pipe, ps, ss, steps, guidance_scale)
        onnx_s = time.perf_counter() - t1
    if runner.calls == 0:
        raise ExportError("the sampler never called the ONNX denoiser; the swap did not take effect")
    images = [{"prompt": p, "seed": s, "psnr_db": psnr(a, b)} for (p, s), a, b in zip(pairs, reference, candidate,
                                                                                     strict=True)]
    finite = [i["psnr_db"] for i in images if i["psnr_db"] is not None]
    return {
        "max_abs_error": max(e["max_abs_error"] for e in errors.values()),
        "errors": errors,
        "images": images,
        "psnr_db_min": min(finite) if finite else None,  # None: every image identical
        "identical_images": len(images) - len(finite),
        "sampling": {"steps": steps, "guidance_scale": guidance_scale, "onnx_denoiser_calls": runner.calls,
                     "seconds_torch": round(torch_s, 3), "seconds_onnx": round(onnx_s, 3)},
        "onnxruntime": _ort_version(),
    }


def random_inputs(signature: DenoiserSignature, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random inputs of the signature's shapes: standard normal floats, a uniform timestep on
    the captured timestep's scale (1000 or 1), and the captured values of integer inputs (ids)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in signature.inputs:
        captured = signature.example[spec.name]
        if spec.name == TIMESTEP:
            scale = 1000.0 if float(captured.abs().max()) > 1.0 else 1.0
            out[spec.name] = torch.rand(spec.shape, generator=g) * scale
        elif captured.is_floating_point() and spec.name not in ("guidance",):
            out[spec.name] = torch.randn(spec.shape, generator=g, dtype=captured.dtype)
        else:
            out[spec.name] = captured.clone()
    return out


def psnr(a, b) -> float | None:
    """PSNR in dB of two images in [0, 255] (peak 255); None when they are identical."""
    import numpy as np

    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return None if mse == 0 else round(10 * math.log10(255.0**2 / mse), 3)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
