"""Stage `environment` (phase 2): record the machine a run happens on.

Writes the device probe (chosen device and dtype, library versions, memory, CUDA/MPS
details, MPS fallback settings, thermal state) to `reports/environment.json`, so every run's
numbers can be read against the hardware that produced them. Reads no params.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from stunning.config import ConfigError

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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="accepted for uniformity; this stage reads no params")
    ap.add_argument("--out", type=Path, default=Path("reports/environment.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        info = run(args.out)
    except (ConfigError, OSError) as exc:
        print(f"environment: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    mem = info["memory"]
    thermal = (info.get("thermal") or {}).get("state", "not reported")
    print(
        f"environment: device {info['device']} ({info['dtype']}), "
        f"{mem['available_mb'] / 1024:.1f}/{mem['total_mb'] / 1024:.1f} GB free, "
        f"torch {info['libraries'].get('torch')}, thermal {thermal} -> {args.out}"
    )


if __name__ == "__main__":
    main()
