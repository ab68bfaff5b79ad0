"""Stage `merge` (phase 6, adapter merge/quantization): blends, a fused model, the quantization ladder.

For every blend in `merge.blends`, writes the exact weighted sum of the style adapters
(`--adapters`/<style>/) as one diffusers LoRA to `--out`/blends/<name>/; fuses `merge.fuse`
(a blend name or a single style) into the base (`--base`) as a full pipeline at
`--out`/fused/; then runs the quantization ladder (`merge.quantization`: `auto` or a list of
int8, fp8, int4, nf4): each level's fused and base denoisers go to `--out`/quantized/<level>/,
are reloaded from disk and measured against float32 on the `validate` prompts and seeds
(size, peak memory, seconds per image, PSNR, SSIM, and per adapter the style gain kept, on
content-matched style sets of `--data`). The smallest level within `budgets.min_quantized_psnr`,
`budgets.max_style_gain_loss` and the memory of `merge.target_device` (the research plan in
`--research`, or an Apple chip) is chosen; `--out`/quantized/quantized.json names it.

Writes `--quantize-report` (JSON: the table and the choice), `--quantize-md`, `--grid` (rows =
levels), `--plot-csv` (size vs fidelity for `dvc plots`), `--report` (`reports/merge.json`: the
chosen level's size ratio and pixel MSE, read by the gate), and an MLflow run. `--out` is
published in one rename.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import re
import time
from pathlib import Path
from typing import Any

from stages._scaffold import parser, run_stage
from stunning.config import ConfigError, Params, dump_resolved

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
GRID_COLUMNS = 4  # fused-model images per level in the grid


def _user_errors() -> tuple[type[Exception], ...]:
    from stunning.blend import BlendError
    from stunning.checks import AdapterError
    from stunning.families import ModelNotFoundError
    from stunning.quantize import QuantizationError
    from stunning.validation import ValidationInputError

    return (AdapterError, BlendError, ModelNotFoundError, QuantizationError, ValidationInputError)


def preflight(params: Params, base: Path, adapters: Path) -> dict[str, Path]:
    """Check names and inputs (adapter files included) before loading any model; return the adapter folder per style."""
    from stunning.blend import LORA_FILE, BlendError
    from stunning.checks import check_adapters
    from stunning.families import check_model_dir, get_family

    try:
        family = get_family(params.base.family)
    except KeyError as exc:
        raise ConfigError(f"base.family: {exc.args[0]}") from None
    for i, b in enumerate(params.merge.blends):
        if not _SAFE_NAME.match(b.name) or b.name in {"fused", "quantized"}:
            raise ConfigError(
                f"merge.blends[{i}].name={b.name!r}: use letters, digits, '.', '_' or '-' (it names a folder)."
            )
    check_model_dir(base, family.required_components)
    needed = {s for b in params.merge.blends for s in b.weights}
    if params.merge.fuse in params.data.styles:
        needed.add(params.merge.fuse)
    dirs = {s: Path(adapters) / s for s in params.data.styles}
    missing = sorted(str(dirs[s] / LORA_FILE) for s in needed if not (dirs[s] / LORA_FILE).is_file())
    if missing:
        raise BlendError(f"adapter weights not found: {missing}. Run the train stage (`dvc repro train`) first.")
    found = {s: d for s, d in dirs.items() if (d / LORA_FILE).is_file()}
    # Header, byte ranges, finite weights and the family's LoRA layout, before any model loads:
    # a damaged adapter is an AdapterError naming the file, not a SafetensorError mid-merge.
    check_adapters(found.values(), family)
    return found


def _target(params: Params, research: Path | None) -> dict[str, Any]:
    from stunning.io import read_json_if_present
    from stunning.quantize import memory_target

    report = read_json_if_present(research)
    return memory_target(params.merge.target_device, report, str(research or "reports/research.json"))


def run(
    params: Params,
    base: Path,
    adapters: Path,
    out: Path,
    report: Path,
    device: str | None = None,
    *,
    data: Path | None = None,
    research: Path | None = None,
    quantize_report: Path | None = None,
    quantize_md: Path | None = None,
    grid: Path | None = None,
    plot_csv: Path | None = None,
    tracker: Any = None,
) -> dict[str, Any]:
    """Blend, fuse, run the quantization ladder; publish `out` atomically and write the reports."""
    from stunning.blend import blend_adapters, fuse
    from stunning.device import select_device
    from stunning.families import get_family
    from stunning.io import atomic_dir, atomic_write_text, relocate_text_paths, write_json
    from stunning.quantize import DEFAULT_LADDER, LadderInputs, choose_level, measure_ladder
    from stunning.validation import style_sets

    t0 = time.perf_counter()
    adapter_dirs = preflight(params, Path(base), Path(adapters))
    family = get_family(params.base.family)
    try:
        dev = select_device(device)
    except ValueError as exc:
        raise ConfigError(f"--device: {exc}") from None
    cfg, val, budgets = params.merge, params.validate_, params.budgets
    target = _target(params, research)
    ladder = list(DEFAULT_LADDER) if cfg.quantization == "auto" else list(cfg.quantization)
    sets = {}
    if data is not None:  # the style gain each adapter keeps needs the references' captions
        sets = style_sets(val.model_copy(update={"style_set_size": min(cfg.style_set_size, val.style_set_size)}),
                          data, list(adapter_dirs))
    out = Path(out)
    blends: dict[str, Any] = {}
    with atomic_dir(out) as tmp:
        for b in cfg.blends:
            res = blend_adapters(adapter_dirs, b.weights, tmp / "blends" / b.name, name=b.name)
            blends[b.name] = {"rank": max(res.rank.values(), default=0), "layers": res.layers}
        source = tmp / "blends" / cfg.fuse if cfg.fuse in blends else adapter_dirs[cfg.fuse]
        fuse(base, family, source, tmp / "fused")
        inputs = LadderInputs(list(val.prompts), [int(s) for s in val.seeds], val.steps, val.guidance_scale,
                              adapters={s: adapter_dirs[s] for s in sets}, style_sets=sets)
        measured = measure_ladder(family, tmp / "fused", Path(base), tmp / "quantized", ladder, inputs, cfg.fuse, dev,
                                  progress=lambda m: log.info("quantization ladder: %s", m))
        chosen, why, levels = choose_level(measured["levels"], budgets.min_quantized_psnr, budgets.max_style_gain_loss,
                                           target["memory_budget_mb"])
        if not sets:
            why += "; style gain not measured (no --data references): adapters were not served on the quantized base"
        for entry in levels:
            if entry["path"]:
                entry["path"] = str(out / "quantized" / entry["level"])
        runnable = [e["level"] for e in levels if e["runs"]]
        index = {"levels": runnable, "chosen": chosen, "load": chosen or (runnable[0] if runnable else None),
                 "note": "load: the chosen level, else (none passed) the first that ran; "
                         "stunning.quantize.load_quantized(<fused>, this folder) loads it"}
        write_json(tmp / "quantized" / "quantized.json", index)
        dump_resolved(cfg, tmp / "merge_config.yaml")
        # Name the published folder, not the temporary one, in what records a source path.
        relocate_text_paths(tmp, tmp, out)
    body = {
        "mode": "auto" if cfg.quantization == "auto" else "ladder",
        "ladder": ladder,
        "target": target,
        "budgets": {"min_psnr": budgets.min_quantized_psnr, "max_style_gain_loss": budgets.max_style_gain_loss},
        "reference": measured["reference"],
        "levels": levels,
        "chosen": chosen,
        "why": why,
        "fused": cfg.fuse,
        "device": str(dev),
        "images_per_variant": {"fused": len(val.prompts) * len(val.seeds),
                               **{s: len(st.references) for s, st in sets.items()}},
    }
    summary = {**_merge_report(body), "fused_from": cfg.fuse, "fused_kind": "blend" if cfg.fuse in blends else "style",
               "blends": blends}
    quantize_report = Path(quantize_report or Path(report).with_name("quantize.json"))
    write_json(quantize_report, body)
    md_path = Path(quantize_md or quantize_report.with_suffix(".md"))
    atomic_write_text(md_path, markdown_table(body))
    grid_path = Path(grid or quantize_report.with_name("quantize_grid.png"))
    _save_grid(grid_path, measured["images"], [(p, s) for p in val.prompts for s in val.seeds], levels)
    plot_path = Path(plot_csv or quantize_report.with_name("quantize_plot.csv"))
    atomic_write_text(plot_path, plot_rows(body))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(Path(report), summary)
    _track(params, body, [quantize_report, md_path, plot_path, grid_path], tracker)
    return {**summary, "quantize": body}


def _merge_report(body: dict[str, Any]) -> dict[str, Any]:
    """`reports/merge.json`: the chosen level's numbers under the names the gate reads."""
    chosen = next((e for e in body["levels"] if e["level"] == body["chosen"]), None)
    fused = chosen["variants"][body["fused"]] if chosen else {}
    return {
        "quantization": body["chosen"],
        "quantization_why": body["why"],
        "fp32_denoiser_bytes": body["reference"]["denoiser_bytes"],
        "int8_denoiser_bytes": chosen["denoiser_bytes"] if chosen else None,  # name kept: the chosen level's bytes
        "quantized_denoiser_bytes": chosen["denoiser_bytes"] if chosen else None,
        "size_ratio": chosen["size_ratio"] if chosen else None,
        "quantization_mse": fused.get("mse"),
        "quantization_max_abs": fused.get("max_abs"),
        "quantization_psnr": fused.get("psnr"),
        "quantization_ssim": fused.get("ssim"),
        "peak_memory_mb_fp32": body["reference"]["peak_memory_mb"],
        "peak_memory_mb_quantized": fused.get("peak_memory_mb"),
        "latency_s_fp32": body["reference"]["latency_s"],
        "latency_s_quantized": fused.get("latency_s"),
        "fidelity_images": body["images_per_variant"]["fused"],
        "device": body["device"],
    }


def _fmt(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def level_rows(body: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per level: size and the worst variant's fidelity/memory/latency."""
    rows = []
    for e in body["levels"]:
        vs = list(e["variants"].values())
        losses = [v["style_gain_loss"] for v in vs if "style_gain_loss" in v]
        rows.append({
            "level": e["level"], "runs": e["runs"], "bytes": e["denoiser_bytes"], "size_ratio": e["size_ratio"],
            "psnr": min((v["psnr"] for v in vs), default=None), "ssim": min((v["ssim"] for v in vs), default=None),
            "style_gain_loss": max(losses, default=None),
            "peak_memory_mb": max((v["peak_memory_mb"] for v in vs), default=None),
            "latency_s": max((v["latency_s"] for v in vs), default=None),
            "passes": e["passes"], "note": e["reason"] or "; ".join(e["failures"]) or "",
        })
    return rows


def plot_rows(body: dict[str, Any]) -> str:
    """`reports/quantize_plot.csv` for `dvc plots` (runnable levels; worst variant per level)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["level", "bytes", "psnr", "ssim", "style_gain_loss"])
    for r in level_rows(body):
        if r["runs"]:
            w.writerow([r["level"], r["bytes"], r["psnr"], r["ssim"], "" if r["style_gain_loss"] is None else r["style_gain_loss"]])
    return buf.getvalue()


def markdown_table(body: dict[str, Any]) -> str:
    ref = body["reference"]
    lines = [
        "# Quantization ladder", "",
        f"Mode `{body['mode']}`, levels {', '.join(body['ladder'])}; target `{body['target']['name']}` "
        f"({body['target']['memory_budget_mb']:.0f} MB: {body['target']['source']}); budgets: PSNR >= "
        f"{body['budgets']['min_psnr']:g} dB, style gain loss <= {body['budgets']['max_style_gain_loss']:g}.", "",
        f"float32 fused denoiser: {ref['denoiser_bytes']} bytes, peak {ref['peak_memory_mb']:.0f} MB, "
        f"{ref['latency_s']:.3f} s/image ({body['device']}). Worst variant per level (the fused model and each "
        "adapter on the quantized base):", "",
        "| level | runs | bytes | size | PSNR dB | SSIM | style gain loss | peak MB | s/image | passes | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in level_rows(body):
        lines.append(
            f"| {r['level']} | {'yes' if r['runs'] else 'no'} | {_fmt(r['bytes'], 'd')} | {_fmt(r['size_ratio'], '.3f')} "
            f"| {_fmt(r['psnr'], '.2f')} | {_fmt(r['ssim'], '.4f')} | {_fmt(r['style_gain_loss'], '+.4f')} "
            f"| {_fmt(r['peak_memory_mb'], '.0f')} | {_fmt(r['latency_s'], '.3f')} | {'yes' if r['passes'] else 'no'} "
            f"| {r['note'].replace('|', '/')} |"
        )
    lines += ["", f"**Chosen: {body['chosen'] or 'none'}** — {body['why']}", ""]
    return "\n".join(lines)


def _save_grid(path: Path, images: dict[str, list], pairs: list[tuple[str, int]], levels: list[dict[str, Any]]) -> None:
    """Rows = float32 then each level that ran; columns = the first prompt/seed images."""
    from stunning.validation import VariantResult, make_grid

    label = {e["level"]: f"{e['level']} ({e['size_ratio']:.2f}x)" for e in levels if e["runs"]}
    rows = {}
    for name, (ims, latency) in images.items():
        v = VariantResult(label.get(name, name), "quantized", name, ims[:GRID_COLUMNS], [latency], 0.0, 0.0)
        rows[v.name] = v
    grid = make_grid(rows, pairs[:GRID_COLUMNS])
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    from stunning.io import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())


def _track(params: Params, body: dict[str, Any], files: list[Path], tracker: Any) -> None:
    """One MLflow run: the choice as tags, each level's numbers as metrics, the table and grid."""
    if tracker is None:
        from stunning.tracking import MlflowTracker, configure_mlflow

        configure_mlflow(params.registry)
        tracker = MlflowTracker()
    tracker.start_run("merge-quantize", tags={"stage": "merge", "quantization.level": str(body["chosen"]),
                                              "quantization.mode": body["mode"]})
    status = "FAILED"
    try:
        tracker.log_params({"ladder": ",".join(body["ladder"]), "target": body["target"]["name"],
                            "min_psnr": body["budgets"]["min_psnr"],
                            "max_style_gain_loss": body["budgets"]["max_style_gain_loss"]})
        tracker.set_tags({"quantization.why": body["why"][:5000]})
        metrics = {}
        for r in level_rows(body):
            for key in ("bytes", "size_ratio", "psnr", "ssim", "style_gain_loss", "peak_memory_mb", "latency_s"):
                if r[key] is not None:
                    metrics[f"{r['level']}/{key}"] = float(r[key])
        tracker.log_metrics(metrics)
        for f in files:
            tracker.log_artifact(f, "quantize")
        status = "FINISHED"
    finally:
        tracker.end_run(status)


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, "--base", "--adapters", "--out", "--report")
    ap.add_argument("--data", type=Path, default=None,
                    help="curated data (its references' captions measure the style gain each quantized adapter keeps)")
    ap.add_argument("--research", type=Path, default=None, help="reports/research.json (merge.target_device: plan)")
    ap.add_argument("--quantize-report", type=Path, default=None, help="the ladder's JSON (default: next to --report)")
    ap.add_argument("--quantize-md", type=Path, default=None, help="the ladder as a Markdown table")
    ap.add_argument("--grid", type=Path, default=None, help="PNG grid: rows = levels")
    ap.add_argument("--plot-csv", type=Path, default=None, help="size vs fidelity for `dvc plots`")
    ap.add_argument("--device", default=None, help="device for the fidelity/memory measurement: auto (default), cpu, cuda, mps")
    run_stage(
        "merge",
        ap,
        argv,
        run=lambda params, a: run(params, a.base, a.adapters, a.out, a.report, a.device, data=a.data,
                                  research=a.research, quantize_report=a.quantize_report, quantize_md=a.quantize_md,
                                  grid=a.grid, plot_csv=a.plot_csv),
        summary=_print_summary,
        errors=_user_errors,
    )


def _print_summary(s: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    body = s["quantize"]
    table = Table(title=f"merge: fused {s['fused_kind']} {s['fused_from']!r}; quantization ladder ({body['mode']}, "
                        f"target {body['target']['name']})")
    for col in ("level", "bytes", "size", "PSNR", "SSIM", "gain loss", "peak MB", "s/img", "passes"):
        table.add_column(col, justify="left" if col == "level" else "right")
    ref = body["reference"]
    table.add_row("float32", str(ref["denoiser_bytes"]), "1.000", "—", "—", "—", f"{ref['peak_memory_mb']:.0f}",
                  f"{ref['latency_s']:.3f}", "")
    for r in level_rows(body):
        table.add_row(r["level"], _fmt(r["bytes"], "d"), _fmt(r["size_ratio"], ".3f"), _fmt(r["psnr"], ".1f"),
                      _fmt(r["ssim"], ".3f"), _fmt(r["style_gain_loss"], "+.3f"), _fmt(r["peak_memory_mb"], ".0f"),
                      _fmt(r["latency_s"], ".3f"), "yes" if r["passes"] else ("no" if r["runs"] else "cannot run"))
    console = Console()
    console.print(table)
    for name, b in s["blends"].items():
        console.print(f"blend {name}: rank {b['rank']}, {b['layers']} layers", highlight=False)
    console.print(f"quantization: {body['chosen'] or 'none'} — {body['why']}", highlight=False)
    console.print(f"{s['seconds']:.1f} s -> {args.out}, {args.report}", highlight=False)


if __name__ == "__main__":
    main()
