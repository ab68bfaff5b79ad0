"""Stage `environment` (phase 2): record the machine a run happens on.

Writes the device probe (chosen device and dtype, library versions, memory, CUDA/MPS
details, MPS fallback settings, thermal state) to `reports/environment.json`, so every run's
numbers can be read against the hardware that produced them. Reads no params.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from stages._scaffold import parser, run_stage

log = logging.getLogger(__name__)


def run(out: Path) -> dict[str, Any]:
    """Probe the machine and write the probe to `out`; returns the probe."""
    from stunning.device import probe
    from stunning.io import write_json

    info = probe()
    write_json(Path(out), info)
    log.info("environment written to %s", out)
    return info


def main(argv: list[str] | None = None) -> None:
    # `--params` is accepted for uniformity; this stage reads no params.
    run_stage(
        "environment",
        parser(__doc__, "--out"),
        argv,
        run=lambda _params, a: run(a.out),
        summary=_print_summary,
        errors=(OSError,),
        params=False,
    )


def _print_summary(info: dict[str, Any], args: argparse.Namespace) -> None:
    mem = info["memory"]
    thermal = (info.get("thermal") or {}).get("state", "not reported")
    print(
        f"environment: device {info['device']} ({info['dtype']}), "
        f"{mem['available_mb'] / 1024:.1f}/{mem['total_mb'] / 1024:.1f} GB free, "
        f"torch {info['libraries'].get('torch')}, thermal {thermal} -> {args.out}"
    )


if __name__ == "__main__":
    main()
