"""Stage `curate` (phase 4, dataset curation): filter, split and validate the ingested set.

Drops low-resolution, blurry, short-caption and near-duplicate images, splits train/val
per style deterministically, and publishes `<split>/<style>/<id>.png` + `.txt`,
`manifest.csv` and `dropped.csv` to `--out` only if the Great Expectations suite passes.
Statistics go to `--stats` (DVC metrics) and every expectation's verdict to
`--validation-report`; both are written even when curation fails, so the reason can be read.
Exit status: 0 ok, 1 the curated data failed validation, 2 bad configuration or input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from stages._scaffold import parser, run_stage
from stunning.config import Params
from stunning.data import DataError

log = logging.getLogger(__name__)


def _write_reports(result: Any, stats: Path, validation_report: Path) -> None:
    from stunning.data.expectations import write_validation_report
    from stunning.io import write_json

    write_json(Path(stats), result.stats)
    if result.validation is not None:
        write_validation_report(result.validation, Path(validation_report))


def run(params: Params, ingested: Path, out: Path, stats: Path, validation_report: Path) -> dict[str, Any]:
    """Curate `ingested` into `out`; write the stats and validation reports (also on failure).

    Raises `stunning.data.curate.CurationFailed` (a `DataError`) when the set is unfit.
    """
    from stunning.data.curate import CurationFailed, curate

    try:
        result = curate(Path(ingested), Path(out), params.data, params.curate)
    except CurationFailed as exc:
        _write_reports(exc.result, stats, validation_report)
        raise
    _write_reports(result, stats, validation_report)
    return {**result.stats, "validation": result.validation.failure_text() if result.validation else "skipped"}


def _run_or_exit_1(params: Params, args: argparse.Namespace) -> dict[str, Any]:
    """`run`; unfit data (not bad input) exits 1 and points at the reports that say why."""
    from stunning.data.curate import CurationFailed

    try:
        return run(params, args.ingested, args.out, args.stats, args.validation_report)
    except CurationFailed as exc:
        print(f"curate: the curated data set is not fit for training; nothing was published.\n{exc}", file=sys.stderr)
        print(f"details: {args.validation_report}, {args.stats}", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv: list[str] | None = None) -> None:
    run_stage(
        "curate",
        parser(__doc__, "--ingested", "--out", "--stats", "--validation-report"),
        argv,
        run=_run_or_exit_1,
        summary=lambda s, a: _print_summary(s, a.out),
        errors=(DataError,),
        # Great Expectations logs its own start-up at INFO (hundreds of lines); keep its warnings.
        quiet=("great_expectations",),
    )


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"curate: {summary['kept']} kept ({summary['train']} train, {summary['val']} val), "
                  f"{summary['dropped']} dropped")
    for col in ("style", "train", "val", "dropped", "mean blur"):
        table.add_column(col, justify="left" if col == "style" else "right")
    for style, s in summary["by_style"].items():
        table.add_row(style, str(s["train"]), str(s["val"]), str(s["dropped"]), f"{s.get('mean_blur', 0):.1f}")
    console.print(table)
    for drop in summary["drops"]:
        console.print(f"  [yellow]dropped[/] {drop['source']}: {drop['reason']} ({drop['detail']})", highlight=False)
    console.print(f"{summary['validation']}; data set -> {out}", highlight=False)


if __name__ == "__main__":
    main()
