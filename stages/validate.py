"""Stage `validate` (phase 7, validation): every variant on fixed prompts/seeds, then the gate.

Generates images for the base, each style adapter, each blend, the fused model and the
quantized model (the level the merge stage chose; `validate` prompts and seeds), measures
style distances to the curated references (`--data`), latency and peak memory, and writes
images + `grid.png` to `--out` and the metrics to `--metrics`. The promotion gate (`budgets`)
compares them — the quantization numbers from `--merge-report` and the ladder's choice from
`--quantize-report` too — with the budgets and with the champion of
`--champion` (`reports/champion.json`, written by the `champion` stage from the registry;
else `--champion-metrics FILE`, else the registry's `@champion`), and writes its verdict to
`--gate`. Per adapter it also measures the held-out denoising loss on the val split
(`eval_loss` in `--metrics`), for the champion's adapters too when the record names them.
`gate.mode`: `enabled` (the checks decide), `dry_run` (checks reported, never promoted) or
`disabled` (checks skipped, the report says so; never promoted automatically).

A failed gate is a result, not an error: the stage writes `--gate` and exits 0; the
register stage acts on the verdict. Bad input exits 2.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from stages._scaffold import parser, run_stage
from stunning.config import ConfigError, Params

log = logging.getLogger(__name__)


def load_champion(path: Path | None, params: Params) -> tuple[dict[str, float] | None, str]:
    """The champion's metrics and where they came from: `path` if given, else the registry.

    `path` may hold a flat metrics dict, a gate report (`candidate.metrics`) or a
    validation report (`style_gain`), so a previous run's files can be used directly.
    """
    from stunning.io import read_json

    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"--champion-metrics {path}: file not found.")
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("candidate"), dict) and "metrics" in data["candidate"]:
            data = data["candidate"]["metrics"]
        elif isinstance(data, dict) and isinstance(data.get("style_gain"), dict):
            data = {f"style_gain/{k}": v for k, v in data["style_gain"].items()}
        if not isinstance(data, dict):
            raise ConfigError(f"--champion-metrics {path}: expected a JSON object of metrics.")
        return {k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}, str(path)
    try:
        from stunning.registry import champion_metrics
    except ImportError as exc:  # the registry (MLflow) is optional for validation itself
        log.warning("registry unavailable (%s): validating without a champion", exc)
        return None, "registry unavailable"
    champ = champion_metrics(params.registry)
    return champ, f"registry {params.registry.model_name}@champion" if champ is not None else "no champion"


def read_champion_record(path: Path) -> tuple[dict[str, float] | None, str, str | None]:
    """(metrics or None, source, adapters folder or None) of a `reports/champion.json`."""
    from stunning.io import read_json

    if not Path(path).is_file():
        raise ConfigError(f"--champion {path}: file not found; run the champion stage (`dvc repro champion`).")
    record = read_json(path)
    if not isinstance(record, dict) or "version" not in record:
        raise ConfigError(f"--champion {path}: not a champion record; rerun the champion stage.")
    if record["version"] is None:
        return None, f"{path}: no champion", None
    metrics = {k: float(v) for k, v in (record.get("metrics") or {}).items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    adapters = record.get("adapters")
    source = f"{record.get('model_name')} v{record['version']} ({path})"
    return metrics, source, adapters if adapters and Path(adapters).is_dir() else None


def eval_metrics(validation: dict[str, Any]) -> dict[str, float]:
    """Flat `eval_gain/<style>` (+ `_std`, and `eval_loss/<style>`) of measured styles."""
    out: dict[str, float] = {}
    for style, e in sorted((validation.get("eval_loss") or {}).items()):
        if e.get("measured"):
            out[f"eval_gain/{style}"] = float(e["gain"])
            out[f"eval_gain_std/{style}"] = float(e["gain_std"])
            out[f"eval_loss/{style}"] = float(e["adapter"])
    return out


def run(
    params: Params,
    base: Path,
    adapters: Path,
    merged: Path,
    data: Path,
    out: Path,
    metrics: Path,
    gate: Path,
    merge_report: Path | None = None,
    champion_metrics: Path | None = None,
    device: str | None = None,
    champion: Path | None = None,
    quantize_report: Path | None = None,
) -> dict[str, Any]:
    """Validate, gate, write `metrics` and `gate` (always, pass or fail); return a summary."""
    from stunning import gate as gate_mod
    from stunning.checks import check_stage_adapters
    from stunning.device import select_device
    from stunning.families import get_family
    from stunning.io import read_json_if_present, write_json
    from stunning.validation import validate

    try:
        get_family(params.base.family)
    except KeyError as exc:
        raise ConfigError(f"base.family: {exc.args[0]}") from None
    check_stage_adapters(params, adapters, merged)  # damaged adapter/blend files: AdapterError before any generation
    try:
        dev = select_device(device)
    except ValueError as exc:
        raise ConfigError(f"--device: {exc}") from None
    from stunning.registry import content_hash

    champion_adapters = None
    if champion is not None:
        champion_data, champion_source, champion_adapters = read_champion_record(champion)
        if champion_metrics is not None:  # an explicit metrics file wins for the comparison
            champion_data, champion_source = load_champion(champion_metrics, params)
    else:
        champion_data, champion_source = load_champion(champion_metrics, params)
    result = validate(params, base, adapters, merged, data, out, device=dev, champion_adapters=champion_adapters)
    merge = read_json_if_present(merge_report)
    if merge is None:
        log.warning("merge report %s not found: the quantization checks will fail", merge_report)
    mode = params.gate.mode
    body = result.to_dict()
    report = gate_mod.evaluate(
        result,
        merge,
        params.budgets,
        champion_data,
        candidate_info={
            "base": str(base),
            "adapters": str(adapters),
            "merged": str(merged),
            "variants": list(result.variants),
            "device": result.device,
            "champion_source": champion_source,
            "content_hash": content_hash(adapters),
        },
        quantize_report=read_json_if_present(quantize_report),
    )
    for key, value in eval_metrics(body).items():
        report.metrics.setdefault(key, value)
    gate_body = report.to_dict()
    gate_body["mode"] = mode
    if mode == "disabled":
        gate_body.update(
            passed=False,
            checks=[],
            reasons=["gate.mode is disabled: checks skipped; not promoted automatically"],
        )
    elif mode == "dry_run":
        gate_body["note"] = "gate.mode is dry_run: checks evaluated and reported; the register stage never promotes"
    body["gate_passed"] = gate_body["passed"]
    body["gate_mode"] = mode
    write_json(Path(metrics), body)
    write_json(Path(gate), gate_body)
    return {"validation": body, "gate": gate_body, "champion_source": champion_source}


def _user_errors() -> tuple[type[Exception], ...]:
    from stunning.checks import AdapterError
    from stunning.families import ModelNotFoundError
    from stunning.quantize import QuantizationError
    from stunning.validation import ValidationInputError

    return (AdapterError, ModelNotFoundError, QuantizationError, ValidationInputError)


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, "--base", "--adapters", "--merged", "--data", "--out", "--metrics", "--gate", "--merge-report",
                "--champion")
    ap.add_argument(
        "--champion-metrics", type=Path, default=None,
        help="JSON of metrics to compare with instead of the --champion record's (e.g. an earlier gate report)",
    )
    ap.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    ap.add_argument("--quantize-report", type=Path, default=None,
                    help="reports/quantize.json: the gate reports the quantization choice and blocks when none passed")
    run_stage(
        "validate",
        ap,
        argv,
        run=lambda params, a: run(
            params, a.base, a.adapters, a.merged, a.data, a.out, a.metrics, a.gate,
            a.merge_report, a.champion_metrics, a.device, a.champion, a.quantize_report,
        ),
        summary=_print_summary,
        errors=_user_errors,
    )


def _print_summary(s: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    v, g = s["validation"], s["gate"]
    styles = sorted(v["reference_images"])
    table = Table(title=f"validation: {v['images_per_variant']} images per variant ({v['seconds']:.1f} s)")
    for col in ("variant", *[f"dist {st}" for st in styles], "dist base", "s/img", "peak MB"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, x in v["variants"].items():
        table.add_row(
            name, *[f"{x['style_distance'][st]:.3f}" for st in styles], f"{x['distance_to_base']:.3f}",
            f"{x['latency_s']:.3f}", f"{x['peak_memory_mb']:.0f}",
        )
    console = Console()
    console.print(table)
    for st, gain in v["style_gain"].items():
        margin = v["style_margin"].get(st)
        info = v["adapters"].get(st, {})
        left = ", ".join(f"{k} {x:.4f}" for k, x in v.get("style_residual", {}).get(st, {}).items())
        console.print(
            f"style gain {st}: {gain:+.3f} (content-matched distance {info.get('base_distance', float('nan')):.3f} -> "
            f"{info.get('own_distance', float('nan')):.3f}"
            + (f"; margin vs other styles {margin:+.3f}" if margin is not None else "") + ")"
            + (f"; largest residual terms: {left}" if left else ""),
            highlight=False,
        )
    for st, e in (v.get("eval_loss") or {}).items():
        if e.get("measured"):
            champ = f"; champion gain {e['champion_gain']:+.4f}" if "champion_gain" in e else ""
            console.print(f"eval loss {st}: base {e['base']:.5f} -> adapter {e['adapter']:.5f} "
                          f"(gain {e['gain']:+.4f} ± {e['gain_std']:.4f}{champ})", highlight=False)
        else:
            console.print(f"eval loss {st}: not measured ({e.get('reason')})", highlight=False)
    if g.get("mode") == "disabled":
        console.print("[bold yellow]GATE DISABLED[/] (gate.mode: disabled; checks skipped, not promoted)")
    elif g["passed"]:
        console.print(f"[bold green]GATE PASSED[/] ({len(g['checks'])} checks; champion: {s['champion_source']})")
    else:
        console.print(f"[bold red]GATE FAILED[/] ({len(g['reasons'])} of {len(g['checks'])} checks; champion: {s['champion_source']})")
        for reason in g["reasons"]:
            console.print(f"  [red]x[/] {reason}", highlight=False)
    console.print(f"images + grid -> {args.out}; metrics -> {args.metrics}; gate -> {args.gate}", highlight=False)


if __name__ == "__main__":
    main()
