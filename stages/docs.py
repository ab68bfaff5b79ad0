"""Stage `docs` (phase 9): render the model card from the stage reports.

Reads `reports/{train,validation,gate,registry}.json` (and `environment.json` if present)
plus the validation grid, and writes `build/model_card/README.md` (Hugging Face model card
with YAML front matter) and `build/model_card/grid.png`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from stunning.config import ConfigError, Params, load_params

log = logging.getLogger(__name__)


def run(params: Params, reports: Path, grid: Path | None, out: Path, license: str = "other") -> dict[str, Any]:
    """Build the model card folder `out`; returns what was written and which reports were missing."""
    from stunning.model_card import build_model_card

    if not Path(reports).is_dir():
        raise FileNotFoundError(f"reports folder {reports} not found: run the pipeline up to `register` first")
    return build_model_card(params, reports, grid, out, license=license)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--reports", type=Path, default=Path("reports"))
    ap.add_argument("--grid", type=Path, default=Path("reports/validation/grid.png"))
    ap.add_argument("--out", type=Path, default=Path("build/model_card"))
    ap.add_argument("--license", default="other", help="license id for the card's front matter")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        summary = run(params, args.reports, args.grid, args.out, license=args.license)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"docs: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    gate = summary["gate_passed"]
    verdict = "gate passed" if gate is True else "gate FAILED" if gate is False else "no gate verdict"
    print(f"model card: {summary['readme']} ({verdict}; grid: {summary['grid'] or 'none'})")
    if summary["missing_reports"]:
        print(f"  note: reports not found, sections left empty: {', '.join(summary['missing_reports'])}")


if __name__ == "__main__":
    main()
