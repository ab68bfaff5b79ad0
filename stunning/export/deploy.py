"""Every deployment export of one model folder, in one go: what the `export` stage runs.

:func:`export_deployment` loads the (fused) model once, captures the denoiser's call at the
configured resolution and batch, and writes into one folder (atomically):

- ``coreml/``: each part (denoiser, VAE decoder/encoder, text encoders) as a float package and
  palettized packages (:mod:`stunning.export.coreml`);
- ``onnx/denoiser.onnx``: the denoiser, checked with ONNX Runtime (max abs error, PSNR of images
  drawn through the same sampler) against the budgets (:mod:`stunning.export.onnx`);
- ``swift/``: the Swift app template with its ``resources.json`` (:mod:`stunning.export.swift`),
  its resources checked and its sampler rule checked against diffusers (``sampler_check``);
- ``export.json``: the full report (per-layer weight errors included) and ``artifacts``, one row
  per exported file with size, bit width and fidelity (what the model card lists).

:func:`summary` is the report without per-layer tables (the stage's DVC metrics);
:func:`render_markdown` is ``reports/export.md``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from stunning.export import ExportError

log = logging.getLogger(__name__)

REPORT_FILE = "export.json"
FORMAT = "stunning-export/1"


def export_deployment(
    model_dir: str | Path,
    out_dir: str | Path,
    config: Any,
    *,
    resolution: int | None = None,
    steps: int = 16,
    guidance_scale: float = 4.0,
    prompts: list[str] | tuple[str, ...] = ("a red dress on a white background",),
    seeds: list[int] | tuple[int, ...] = (0,),
    family: str | None = None,
) -> dict[str, Any]:
    """Write the exports `config` (an :class:`~stunning.config.ExportConfig`) asks for into `out_dir`.

    `steps`, `guidance_scale`, `prompts` and `seeds`: the sampler of the ONNX image check and of
    the Swift manifest. Budget failures (ONNX error or PSNR) are listed in ``report["failures"]``;
    the folder is still written (the caller decides whether to fail).
    """
    import torch

    from stunning.export.components import at_resolution, capture_at, check_family, components
    from stunning.families import get_family
    from stunning.io import atomic_dir, write_json
    from stunning.model_source import detect_family

    targets = list(config.targets)
    cm = config.coreml
    model_dir = Path(model_dir)
    fam = get_family(family or detect_family(model_dir))
    check_family(fam.name)
    if "coreml" in targets:
        from stunning.export.coreml import _coremltools, check_options

        check_options(cm.palettize_bits, cm.palettize_mode, cm.precision)
        ct = _coremltools()
    t0 = time.perf_counter()
    pipe = fam.load_pipeline(model_dir, torch.device("cpu"), torch.float32)
    signature = capture_at(fam, pipe, resolution=resolution, batch=config.batch, guidance_scale=guidance_scale)
    res = resolution or fam.resolution(pipe)
    sized = at_resolution(fam, res)
    parts = components(fam, pipe, signature, batch=config.batch) if "coreml" in targets else []  # Core ML and Swift
    seconds: dict[str, float] = {"load_and_capture": round(time.perf_counter() - t0, 3)}
    report: dict[str, Any] = {
        "format": FORMAT, "model_dir": str(model_dir), "family": fam.name, "resolution": res,
        "batch": config.batch, "guidance_scale": guidance_scale, "steps": steps, "targets": targets,
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if "coreml" in targets:
            from stunning.export.coreml import export_components

            t1 = time.perf_counter()
            (tmp / "coreml").mkdir()
            report["coreml"] = export_components(ct, parts, tmp / "coreml", nbits=cm.palettize_bits,
                                                 mode=cm.palettize_mode, precision=cm.precision,
                                                 deployment_target=cm.deployment_target)
            seconds["coreml"] = round(time.perf_counter() - t1, 3)
        if "onnx" in targets:
            from stunning.export.onnx import export_loaded

            t2 = time.perf_counter()
            (tmp / "onnx").mkdir()
            report["onnx"] = export_loaded(sized, pipe, signature, tmp / "onnx", exporter=config.onnx.exporter,
                                           prompts=prompts, seeds=seeds, steps=steps, guidance_scale=guidance_scale)
            seconds["onnx"] = round(time.perf_counter() - t2, 3)
        if "coreml" in targets:
            t3 = time.perf_counter()
            report["swift"] = _swift(tmp, sized, pipe, model_dir, report["coreml"], parts, res, config.batch,
                                     guidance_scale, steps, prompts[0])
            seconds["swift"] = round(time.perf_counter() - t3, 3)
        report["not_covered"] = not_covered()
        report["failures"] = budget_failures(report, config)
        report["artifacts"] = artifacts(report, tmp)
        report["seconds"] = seconds
        write_json(tmp / REPORT_FILE, report)
    return report


def _swift(tmp: Path, fam, pipe, model_dir: Path, coreml: dict, parts, res: int, batch: int, guidance: float,
           steps: int, prompt: str) -> dict[str, Any]:
    import json

    from stunning.export.swift import MANIFEST, SWIFT_FAMILIES, missing_resources, render_swift

    if fam.name not in SWIFT_FAMILIES:
        return {"skipped": f"the Swift template covers {list(SWIFT_FAMILIES)}, not {fam.name}"}
    swift = render_swift(tmp / "swift", fam, pipe, model_dir, coreml, resolution=res, batch=batch,
                         guidance_scale=guidance, steps=steps)
    swift["missing_resources"] = missing_resources(tmp / "swift")
    manifest = json.loads((tmp / "swift" / MANIFEST).read_text())
    swift["sampler_check"] = sampler_check(fam, pipe, {p.name: p for p in parts}, manifest, prompt)
    return swift


def sampler_check(fam, pipe, parts: dict, manifest: dict, prompt: str) -> dict[str, Any]:
    """The Swift app's loop (mirrored in torch, :func:`~stunning.export.swift.mirror_sample`) against
    the diffusers pipeline from the same initial noise: max abs difference of the final latents."""
    import torch

    from stunning.export.swift import mirror_sample

    shape = tuple(parts["vae_decoder"].inputs[0].shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mirrored = mirror_sample(pipe, parts, manifest, prompt, noise)
    extra = {"max_sequence_length": fam.t5_tokens(pipe)} if fam.name == "sd3" else {}
    with torch.no_grad():
        ref = pipe(prompt=[prompt] * manifest["batch"], negative_prompt=[""] * manifest["batch"],
                   num_inference_steps=manifest["steps"], guidance_scale=manifest["guidance_scale"],
                   height=manifest["resolution"], width=manifest["resolution"], latents=noise.clone(),
                   output_type="latent", **extra).images
    return {"max_abs_error": float((mirrored - ref).abs().max()), "reference_max_abs": float(ref.abs().max()),
            "steps": manifest["steps"], "prompt": prompt}


def not_covered() -> dict[str, str]:
    from stunning.export.components import FLUX_NOT_COVERED

    return {"flux": FLUX_NOT_COVERED,
            "coreml_prediction": "Core ML predictions (package vs torch, image PSNR) need macOS; they are "
                                 "tests that skip elsewhere, and each package's report says prediction.skipped"}


def budget_failures(report: dict[str, Any], config: Any) -> list[str]:
    """Which budgets the exports break (empty: all within)."""
    failures = []
    onnx = report.get("onnx")
    if onnx:
        if onnx["max_abs_error"] > config.onnx.max_abs_error:
            failures.append(f"onnx max abs error {onnx['max_abs_error']:.3g} > export.onnx.max_abs_error "
                            f"{config.onnx.max_abs_error:g}")
        if onnx["psnr_db_min"] is not None and onnx["psnr_db_min"] < config.onnx.min_psnr_db:
            failures.append(f"onnx image PSNR {onnx['psnr_db_min']:.1f} dB < export.onnx.min_psnr_db "
                            f"{config.onnx.min_psnr_db:g}")
    swift = report.get("swift") or {}
    failures += [f"swift resources: {p}" for p in swift.get("missing_resources", [])]
    check = swift.get("sampler_check")
    if check and check["max_abs_error"] > 1e-3 * max(1.0, check["reference_max_abs"]):
        failures.append(f"the Swift sampler rule differs from diffusers by {check['max_abs_error']:.3g} (latents)")
    return failures


def artifacts(report: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """One row per exported file: path (relative to the export folder), format, part, bits, bytes, fidelity."""
    from stunning.export.coreml import tree_bytes

    rows = []
    for name, part in (report.get("coreml") or {}).get("components", {}).items():
        for variant, p in part["packages"].items():
            rows.append({
                "path": f"coreml/{p['package']}", "format": "coreml", "component": name, "variant": variant,
                "bits": p["bits"], "bytes": p["bytes"],
                "fidelity": {"weight_rel_rms_error_mean": p["rel_rms_error_mean"],
                             "weight_rel_rms_error_max": p["rel_rms_error_max"],
                             "weight_max_abs_error": p["max_abs_error"],
                             "graph_max_abs_error": part["graph_check"]["max_abs_error"]},
            })
    onnx = report.get("onnx")
    if onnx:
        for f in onnx["files"]:
            rows.append({"path": f"onnx/{f}", "format": "onnx", "component": "denoiser", "variant": "float32",
                         "bits": 32, "bytes": (root / "onnx" / f).stat().st_size,
                         "fidelity": {"max_abs_error": onnx["max_abs_error"], "psnr_db_min": onnx["psnr_db_min"],
                                      "identical_images": onnx["identical_images"], "images": len(onnx["images"])}})
    swift = report.get("swift")
    if swift and "path" in swift:
        rows.append({"path": "swift", "format": "swift-package", "component": "app", "variant": None, "bits": None,
                     "bytes": tree_bytes(root / "swift"),
                     "fidelity": {"compiled": False,
                                  "sampler_max_abs_error": swift["sampler_check"]["max_abs_error"]}})
    return rows


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """`report` without the per-layer weight tables and per-image rows (small enough for DVC metrics)."""
    import copy

    out = copy.deepcopy(report)
    for part in (out.get("coreml") or {}).get("components", {}).values():
        for p in part["packages"].values():
            p.pop("layers", None)
    if out.get("onnx"):
        out["onnx"].pop("images", None)
    if out.get("swift"):
        out["swift"].pop("files", None)
    return out


def worst_layers(package: dict[str, Any], n: int = 3) -> list[tuple[str, float]]:
    layers = package.get("layers") or {}
    ranked = sorted(((k, v["rel_rms_error"]) for k, v in layers.items() if v["palettized"]), key=lambda kv: -kv[1])
    return ranked[:n]


def render_markdown(report: dict[str, Any]) -> str:
    """``reports/export.md``: artifacts, per-part checks, the worst palettized layers, what is not covered."""
    lines = [f"# Deployment exports ({report['family']}, {report['resolution']} px, batch {report['batch']})", ""]
    lines += ["| artifact | format | bits | MB | fidelity |", "|---|---|---|---|---|"]
    for a in report.get("artifacts", []):
        fid = ", ".join(f"{k} {_short(v)}" for k, v in a["fidelity"].items())
        lines.append(f"| `{a['path']}` | {a['format']} | {a['bits'] or '-'} | {a['bytes'] / 1e6:.2f} | {fid} |")
    cm = report.get("coreml")
    if cm:
        lines += ["", f"Core ML: coremltools {cm['coremltools']}, {cm['precision']} float packages, "
                      f"{cm['palettization']['mode']} palettization per tensor, target {cm['deployment_target']}.", ""]
        lines += ["| part | inputs | outputs | exported graph vs diffusers (max abs) | worst palettized layers (rel. RMS) |",
                  "|---|---|---|---|---|"]
        for name, part in cm["components"].items():
            ins = "; ".join(f"{i['name']} {'x'.join(map(str, i['shape']))} {i['dtype']}" for i in part["inputs"])
            outs = "; ".join(f"{o['name']} {'x'.join(map(str, o['shape']))}" for o in part["outputs"])
            bits = [p for v, p in part["packages"].items() if v.endswith("bit")]
            worst = ", ".join(f"{k} {e:.3g}" for k, e in worst_layers(bits[-1])) if bits else "-"
            lines.append(f"| {name} | {ins} | {outs} | {part['graph_check']['max_abs_error']:.2e} | {worst} |")
        first = next(iter(cm["components"].values()), {})
        skipped = (first.get("prediction") or {}).get("skipped")
        if skipped:
            lines += ["", f"Core ML predictions: not run ({skipped})."]
    onnx = report.get("onnx")
    if onnx:
        psnr = "identical images" if onnx["psnr_db_min"] is None else f"min PSNR {onnx['psnr_db_min']:.1f} dB"
        lines += ["", f"ONNX ({onnx['exporter']}, opset {onnx['opset']}, onnxruntime {onnx['onnxruntime']}): max abs "
                      f"error {onnx['max_abs_error']:.2e} vs torch; images through the same sampler: {psnr} "
                      f"({onnx['identical_images']}/{len(onnx.get('images', []))} identical)."]
    swift = report.get("swift")
    if swift:
        if "skipped" in swift:
            lines += ["", f"Swift template: {swift['skipped']}."]
        else:
            lines += ["", f"Swift template (`swift/`): {swift['reason']} Sampler rule vs diffusers: max abs "
                          f"{swift['sampler_check']['max_abs_error']:.2e} on the latents; missing resources: "
                          f"{len(swift['missing_resources'])}."]
    lines += ["", "Not covered:", ""] + [f"- {k}: {v}" for k, v in report.get("not_covered", {}).items()]
    if report.get("failures"):
        lines += ["", "**Budget failures:**", ""] + [f"- {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "n/a" if v is None else str(v)


__all__ = ["ExportError", "export_deployment", "summary", "render_markdown", "artifacts"]
