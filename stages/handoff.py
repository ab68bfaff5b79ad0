"""Stage `handoff` (phase 10): assemble the release bundle a user receives.

Copies the style adapters, the pre-computed blends and the model card into `dist/release/`,
adds `blends.yaml`, a runnable `example.py` (stock diffusers only), `manifest.json` and
`SHA256SUMS`, then verifies the result. `stunning verify dist/release` re-checks it later.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from stunning.config import ConfigError, Params, load_params

log = logging.getLogger(__name__)


def run(params: Params, adapters: Path, blends: Path, model_card: Path, out: Path) -> dict[str, Any]:
    """Build the bundle and verify it; a bundle that does not verify is an error, not a warning."""
    from stunning.bundle import build_bundle, verify_bundle
    from stunning.model_card import base_model_id

    summary = build_bundle(out, adapters, blends, model_card, params, base_model=base_model_id(params))
    result = verify_bundle(out)
    if not result.ok:
        raise RuntimeError(f"the bundle just built does not verify:\n{result.describe()}")
    summary["verified"] = result.checked
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--adapters", type=Path, default=Path("models/adapters"))
    ap.add_argument("--blends", type=Path, default=Path("models/merged/blends"))
    ap.add_argument("--model-card", type=Path, default=Path("build/model_card"))
    ap.add_argument("--out", type=Path, default=Path("dist/release"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from stunning.bundle import BundleError

    try:
        params = load_params(args.params)
        summary = run(params, args.adapters, args.blends, args.model_card, args.out)
    except (ConfigError, BundleError) as exc:
        print(f"handoff: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"release bundle {summary['out']}: {summary['files']} files, {summary['bytes'] / 1e6:.1f} MB, "
        f"styles {', '.join(summary['styles'])}, blends {', '.join(summary['blends']) or 'none'}; "
        f"{summary['verified']} checksums verified. Check later with `stunning verify {summary['out']}`."
    )


if __name__ == "__main__":
    main()
