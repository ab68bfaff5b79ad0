"""Stage `ingest` (phase 3, data pipeline): raw style folders -> normalised images + manifest.

Reads `<raw>/<style>/` for each style in `data.styles` (images with same-name `.txt`
captions or a `metadata.jsonl`), writes square PNGs at `data.resolution` and
`manifest.jsonl` to `--out`, and reports every rejected file with its reason in
`--report` (JSON, DVC metrics) and `--report-md` (Markdown, with what to do).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stages._scaffold import parser, run_stage
from stunning.config import Params
from stunning.data import DataError

log = logging.getLogger(__name__)


def run(params: Params, raw: Path, out: Path, report: Path, report_md: Path) -> dict[str, Any]:
    """Ingest `raw` into `out` and write both reports; returns the JSON report."""
    from stunning.data.ingest import ingest, write_ingest_reports

    result = ingest(Path(raw), Path(out), params.data)
    write_ingest_reports(result, Path(report), Path(report_md))
    return result.to_dict()


def main(argv: list[str] | None = None) -> None:
    run_stage(
        "ingest",
        parser(__doc__, "--raw", "--out", "--report", "--report-md"),
        argv,
        run=lambda params, a: run(params, a.raw, a.out, a.report, a.report_md),
        summary=lambda s, a: _print_summary(s, a.report_md),
        errors=(DataError,),
    )


def _print_summary(summary: dict[str, Any], report_md: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"ingest: {summary['accepted']} accepted, {summary['rejected']} rejected")
    table.add_column("style")
    table.add_column("accepted", justify="right")
    table.add_column("rejected", justify="right")
    for style, counts in summary["by_style"].items():
        table.add_row(style, str(counts["accepted"]), str(counts["rejected"]))
    console.print(table)
    for rej in summary["rejections"]:
        console.print(f"  [yellow]rejected[/] {rej['file']}: {rej['reason']} ({rej['detail']})", highlight=False)
    for warn in summary["warnings"]:
        console.print(f"  [dim]warning[/] {warn['file']}: {warn['reason']} ({warn['detail']})", highlight=False)
    if summary["rejections"]:
        console.print(f"what to do about each: {report_md}", highlight=False)


if __name__ == "__main__":
    main()
