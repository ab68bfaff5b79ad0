"""Stage `sample_data` (phase 3, data pipeline): write the embedded sample photo set.

Generates `data.sample_images_per_style` procedural fashion images per style (plus a few
deliberately bad files that ingest and curation must report) into `--out`, with a
`README.md` describing them. It always runs (it takes about a second): with
`data.source: local` the set is still written, for the two built-in styles, and its
README says it is unused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stages._scaffold import parser, run_stage
from stunning.config import Params

log = logging.getLogger(__name__)


def run(params: Params, out: Path) -> dict[str, Any]:
    """Generate the sample set into `out`; returns what was written."""
    from stunning.data.sample import generate_sample

    summary = generate_sample(Path(out), params.data)
    return {
        "out": str(summary.out_dir),
        "styles": summary.styles,
        "images_per_style": summary.good_per_style,
        "bad_files": summary.bad_files,
        "used_for_training": summary.used_for_training,
    }


def main(argv: list[str] | None = None) -> None:
    run_stage(
        "sample_data",
        parser(__doc__, "--out"),
        argv,
        run=lambda params, a: run(params, a.out),
        summary=lambda s, a: _print_summary(s),
    )


def _print_summary(summary: dict[str, Any]) -> None:
    note = "" if summary["used_for_training"] else " (unused: data.source is local)"
    print(
        f"sample set: {summary['images_per_style']} images x {len(summary['styles'])} styles "
        f"({', '.join(summary['styles'])}) + {len(summary['bad_files'])} deliberately bad files "
        f"-> {summary['out']}{note}"
    )


if __name__ == "__main__":
    main()
