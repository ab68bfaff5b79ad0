"""Stage `export` (phase 7, after validation): deployment exports of the fused model.

Exports the fused model the merge stage wrote (`--model`, models/merged/fused) with fixed shapes
at `data.resolution` for `export.batch` images: Core ML packages of every part (denoiser, VAE
decoder and encoder, text encoders), float16 and palettized at `export.coreml.palettize_bits`;
the denoiser to ONNX, checked with ONNX Runtime against torch (max abs error, PSNR of images
drawn through the same sampler on the first `validate` prompts); and the Swift app template with
its resources manifest. Everything goes to `--out` (build/export, published in one rename, with
the full report export.json); `--report` (reports/export.json, DVC metrics) and `--report-md`
hold the summary. Exits 2 when an export breaks a budget of `export.onnx` (after writing both).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from stages._scaffold import parser, run_stage
from stunning.config import Params

log = logging.getLogger(__name__)

CHECK_PROMPTS = 2  # images of the ONNX check: the first validate prompts, the first seed


def _user_errors() -> tuple[type[Exception], ...]:
    from stunning.export import ExportError
    from stunning.families import ModelNotFoundError

    return (ExportError, ModelNotFoundError)


def run(params: Params, model: Path, out: Path, report: Path, report_md: Path) -> dict[str, Any]:
    """Export, write the reports, and raise ExportError listing any budget the exports break."""
    from stunning.export import ExportError
    from stunning.export.deploy import export_deployment, render_markdown, summary
    from stunning.families import ModelNotFoundError
    from stunning.io import atomic_write_text, write_json

    model = Path(model)
    if not (model / "model_index.json").is_file():
        raise ModelNotFoundError(f"{model} is not a diffusers model folder: run the merge stage first (`dvc repro merge`).")
    val = params.validate_
    full = export_deployment(
        model, out, params.export, family=params.base.family, resolution=params.data.resolution,
        steps=val.steps, guidance_scale=val.guidance_scale, prompts=list(val.prompts[:CHECK_PROMPTS]),
        seeds=list(val.seeds[:1]),
    )
    short = summary(full)
    write_json(Path(report), short)
    atomic_write_text(Path(report_md), render_markdown(full))
    if full["failures"]:
        raise ExportError("the exports break their budgets (see " + str(report) + "): " + "; ".join(full["failures"]))
    return short


def main(argv: list[str] | None = None) -> None:
    run_stage(
        "export",
        parser(__doc__, "--model", "--out", "--report", "--report-md"),
        argv,
        run=lambda params, a: run(params, a.model, a.out, a.report, a.report_md),
        summary=_print_summary,
        errors=_user_errors,
        quiet=("coremltools",),
    )


def _print_summary(s: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"export: {s['family']} at {s['resolution']} px, batch {s['batch']} -> {args.out}")
    for col in ("artifact", "bits", "MB", "fidelity"):
        table.add_column(col)
    for a in s["artifacts"]:
        fid = a["fidelity"]
        text = (f"weights rel. RMS {fid['weight_rel_rms_error_mean']:.2g} (mean)" if a["format"] == "coreml"
                else f"max abs {fid['max_abs_error']:.1e}, min PSNR {fid['psnr_db_min'] or 'identical'}"
                if a["format"] == "onnx" else "not compiled here")
        table.add_row(a["path"], str(a["bits"] or "-"), f"{a['bytes'] / 1e6:.2f}", text)
    console = Console()
    console.print(table)
    console.print(f"{sum(s['seconds'].values()):.1f} s; report {args.report}", highlight=False)


if __name__ == "__main__":
    main()
