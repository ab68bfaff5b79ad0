"""Stage `research` (phase 1): size the candidate base models against this machine.

Counts each candidate's parameters from its configs (no weights), estimates inference and
LoRA-training memory at fp32/bf16/fp16/int8/int4, and picks the plan for `params.base`:
the highest precision whose training fits. Writes `reports/research.json` and a Markdown
table `reports/research.md`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from stunning.config import ConfigError, Params, load_params

log = logging.getLogger(__name__)


def run(params: Params, out_json: Path, out_md: Path, device_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the fit report (probing the machine unless `device_info` is given) and write it."""
    from stunning.device import probe
    from stunning.research import build_report, write_report

    report = build_report(params.research, params.base, device_info if device_info is not None else probe())
    write_report(report, out_json, out_md)
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out-json", type=Path, default=Path("reports/research.json"))
    ap.add_argument("--out-md", type=Path, default=Path("reports/research.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        report = run(params, args.out_json, args.out_md)
    except ConfigError as exc:
        print(f"research: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    from rich.console import Console

    from stunning.cli import research_table
    from stunning.research import plan_summary

    table = research_table(report)
    console = Console()
    console.print(table)
    console.print(f"plan: {plan_summary(report)} -> {args.out_json}, {args.out_md}")


if __name__ == "__main__":
    main()
