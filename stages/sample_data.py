"""Stage `sample_data` (phase 3, data pipeline): write the embedded sample photo set.

Generates `data.sample_images_per_style` procedural fashion images per style (plus a few
deliberately bad files that ingest and curation must report) into `--out`, with a
`README.md` describing them. It always runs (it takes about a second): with
`data.source: local` the set is still written, for the two built-in styles, and its
README says it is unused.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from stunning.config import ConfigError, Params, load_params

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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, default=Path("data/sample"), help="folder to (re)create")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        summary = run(params, args.out)
    except ConfigError as exc:
        print(f"sample_data: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    note = "" if summary["used_for_training"] else " (unused: data.source is local)"
    print(
        f"sample set: {summary['images_per_style']} images x {len(summary['styles'])} styles "
        f"({', '.join(summary['styles'])}) + {len(summary['bad_files'])} deliberately bad files "
        f"-> {summary['out']}{note}"
    )


if __name__ == "__main__":
    main()
