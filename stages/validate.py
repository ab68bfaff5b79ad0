"""Stage `validate` (phase 7, validation): every variant on fixed prompts/seeds, then the gate.

Generates images for the base, each style adapter, each blend, the fused model and the
int8 model (`validate` prompts and seeds), measures style distances to the curated
references (`--data`), latency and peak memory, and writes images + `grid.png` to `--out`
and the metrics to `--metrics`. The promotion gate (`budgets`) compares them — and the
quantization numbers from `--merge-report` — with the budgets and with the registry's
`@champion` (or `--champion-metrics FILE`), and writes its verdict to `--gate`.

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
) -> dict[str, Any]:
    """Validate, gate, write `metrics` and `gate` (always, pass or fail); return a summary."""
    from stunning import gate as gate_mod
    from stunning.device import select_device
    from stunning.families import get_family
    from stunning.io import read_json, write_json
    from stunning.validation import validate

    try:
        get_family(params.base.family)
    except KeyError as exc:
        raise ConfigError(f"base.family: {exc.args[0]}") from None
    try:
        dev = select_device(device)
    except ValueError as exc:
        raise ConfigError(f"--device: {exc}") from None
    champion, champion_source = load_champion(champion_metrics, params)
    result = validate(params, base, adapters, merged, data, out, device=dev)
    merge = read_json(merge_report) if merge_report is not None and Path(merge_report).is_file() else None
    if merge is None:
        log.warning("merge report %s not found: the quantization checks will fail", merge_report)
    report = gate_mod.evaluate(
        result,
        merge,
        params.budgets,
        champion,
        candidate_info={
            "base": str(base),
            "adapters": str(adapters),
            "merged": str(merged),
            "variants": list(result.variants),
            "device": result.device,
            "champion_source": champion_source,
        },
    )
    body = result.to_dict()
    body["gate_passed"] = report.passed
    write_json(Path(metrics), body)
    write_json(Path(gate), report.to_dict())
    return {"validation": body, "gate": report.to_dict(), "champion_source": champion_source}


def _user_errors() -> tuple[type[Exception], ...]:
    from stunning.families import ModelNotFoundError
    from stunning.quantize import QuantizationError
    from stunning.validation import ValidationInputError

    return (ModelNotFoundError, QuantizationError, ValidationInputError)


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, "--base", "--adapters", "--merged", "--data", "--out", "--metrics", "--gate", "--merge-report")
    ap.add_argument(
        "--champion-metrics", type=Path, default=None,
        help="JSON of the champion's metrics (default: the registry's @champion, if any)",
    )
    ap.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    run_stage(
        "validate",
        ap,
        argv,
        run=lambda params, a: run(
            params, a.base, a.adapters, a.merged, a.data, a.out, a.metrics, a.gate,
            a.merge_report, a.champion_metrics, a.device,
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
    if g["passed"]:
        console.print(f"[bold green]GATE PASSED[/] ({len(g['checks'])} checks; champion: {s['champion_source']})")
    else:
        console.print(f"[bold red]GATE FAILED[/] ({len(g['reasons'])} of {len(g['checks'])} checks; champion: {s['champion_source']})")
        for reason in g["reasons"]:
            console.print(f"  [red]x[/] {reason}", highlight=False)
    console.print(f"images + grid -> {args.out}; metrics -> {args.metrics}; gate -> {args.gate}", highlight=False)


if __name__ == "__main__":
    main()
