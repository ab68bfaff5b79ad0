"""Stage `handoff` (phase 10): assemble the release bundle a user receives.

Copies the style adapters, the pre-computed blends and the model card into `dist/release/`,
adds `blends.yaml`, a runnable `example.py` (stock diffusers only), `manifest.json` and
`SHA256SUMS`, then verifies the result. `stunning verify dist/release` re-checks it later.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stages._scaffold import parser, run_stage
from stunning.config import Params

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


def _user_errors() -> tuple[type[Exception], ...]:
    from stunning.bundle import BundleError

    return (BundleError,)


def main(argv: list[str] | None = None) -> None:
    run_stage(
        "handoff",
        parser(__doc__, "--adapters", "--blends", "--model-card", "--out"),
        argv,
        run=lambda params, a: run(params, a.adapters, a.blends, a.model_card, a.out),
        summary=lambda s, a: _print_summary(s),
        errors=_user_errors,
    )


def _print_summary(summary: dict[str, Any]) -> None:
    print(
        f"release bundle {summary['out']}: {summary['files']} files, {summary['bytes'] / 1e6:.1f} MB, "
        f"styles {', '.join(summary['styles'])}, blends {', '.join(summary['blends']) or 'none'}; "
        f"{summary['verified']} checksums verified. Check later with `stunning verify {summary['out']}`."
    )


if __name__ == "__main__":
    main()
