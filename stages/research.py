"""Stage `research` (phase 1): size the candidate base models against this machine.

Counts each candidate's parameters from its configs (no weights), estimates inference and
LoRA-training memory at fp32/bf16/fp16/int8/int4, and picks the plan for `params.base`:
the highest precision whose training fits among those the trainer runs on this device
(`train.base_precision: auto` trains at it; int8/int4 quantize the frozen denoiser). Writes `reports/research.json` and a Markdown
table `reports/research.md`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from stages._scaffold import parser, run_stage
from stunning.config import Params

log = logging.getLogger(__name__)


def run(params: Params, out_json: Path, out_md: Path, device_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the fit report (probing the machine unless `device_info` is given) and write it."""
    from stunning.device import probe
    from stunning.research import build_report, write_report

    info = device_info if device_info is not None else probe()
    report = build_report(params.research, params.base, info, train=params.train)  # sizes train's adapter
    write_report(report, out_json, out_md)
    return report


def main(argv: list[str] | None = None) -> None:
    run_stage(
        "research",
        parser(__doc__, "--out-json", "--out-md"),
        argv,
        run=lambda params, a: run(params, a.out_json, a.out_md),
        summary=_print_summary,
    )


def _print_summary(report: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.console import Console

    from stunning.research import plan_summary, research_table

    table = research_table(report)
    console = Console()
    console.print(table)
    console.print(f"plan: {plan_summary(report)} -> {args.out_json}, {args.out_md}")


if __name__ == "__main__":
    main()
