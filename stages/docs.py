"""Stage `docs` (phase 9): render the model card from the stage reports.

Reads `reports/{train,validation,gate,registry}.json` (and `environment.json`, `export.json`
(deployment exports) and `quantize.json` (the quantization ladder) if present) plus the
validation grid, and writes `build/model_card/README.md` (Hugging Face model card
with YAML front matter) and `build/model_card/grid.png`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stages._scaffold import parser, run_stage
from stunning.config import Params

log = logging.getLogger(__name__)


def run(params: Params, reports: Path, grid: Path | None, out: Path, license: str = "other") -> dict[str, Any]:
    """Build the model card folder `out`; returns what was written and which reports were missing."""
    from stunning.model_card import build_model_card

    if not Path(reports).is_dir():
        raise FileNotFoundError(f"reports folder {reports} not found: run the pipeline up to `register` first")
    return build_model_card(params, reports, grid, out, license=license)


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, "--reports", "--grid", "--out")
    ap.add_argument("--license", default="other", help="license id for the card's front matter")
    run_stage(
        "docs",
        ap,
        argv,
        run=lambda params, a: run(params, a.reports, a.grid, a.out, license=a.license),
        summary=lambda s, a: _print_summary(s),
        errors=(FileNotFoundError,),
    )


def _print_summary(summary: dict[str, Any]) -> None:
    gate = summary["gate_passed"]
    verdict = "gate passed" if gate is True else "gate FAILED" if gate is False else "no gate verdict"
    print(f"model card: {summary['readme']} ({verdict}; grid: {summary['grid'] or 'none'})")
    if summary["missing_reports"]:
        print(f"  note: reports not found, sections left empty: {', '.join(summary['missing_reports'])}")


if __name__ == "__main__":
    main()
