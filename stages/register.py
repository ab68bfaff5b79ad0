"""Stage `register` (phase 8, backend): record the candidate in the MLflow model registry.

Every candidate becomes a new version of `registry.model_name`, tagged with the gate
verdict, reasons, checks and metrics; `@champion` moves to it only if the gate passed (the
replaced champion stays as `@previous-champion` for rollback). A blocked candidate is not
an error: the stage exits 0 either way and says which happened. Writes
`reports/registry.json` (the version, whether it was promoted, and where the aliases point).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from stunning.config import ConfigError, Params, load_params

log = logging.getLogger(__name__)


class StageInputError(ValueError):
    """A missing or malformed input file; the message names it and what to run."""


def read_gate(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise StageInputError(f"{path}: gate report not found; run the validate stage first (`dvc repro validate`).")
    try:
        gate = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageInputError(f"{path}: not valid JSON ({exc}); rerun the validate stage.") from exc
    if not isinstance(gate, dict) or not isinstance(gate.get("passed"), bool):
        raise StageInputError(f"{path}: no boolean 'passed' verdict; rerun the validate stage.")
    return gate


def run(
    params: Params,
    gate_path: Path,
    base: Path,
    adapters: Path,
    blends: Path,
    out: Path,
    root: Path | None = None,
) -> dict[str, Any]:
    """Register the candidate per the gate verdict, write `out`, return the registry result."""
    gate = read_gate(gate_path)  # before importing MLflow, so a missing report fails fast

    from stunning.io import write_json
    from stunning.registry import RegistryError, register_candidate

    try:
        result = register_candidate(
            params.registry,
            gate,
            {"adapters": Path(adapters), "blends": Path(blends)},
            Path(base),
            params.base.family,
            params.model_dump(by_alias=True, mode="json"),
            root=root,
        )
    except RegistryError as exc:
        raise StageInputError(str(exc)) from exc
    write_json(Path(out), {**result, "tracking_uri": params.registry.tracking_uri, "gate_report": str(gate_path)})
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--gate", type=Path, default=Path("reports/gate.json"))
    ap.add_argument("--base", type=Path, required=True, help="the base model folder (${base.path})")
    ap.add_argument("--adapters", type=Path, default=Path("models/adapters"))
    ap.add_argument("--blends", type=Path, default=Path("models/merged/blends"))
    ap.add_argument("--out", type=Path, default=Path("reports/registry.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from stunning.families import ModelNotFoundError

    try:
        params = load_params(args.params)
        result = run(params, args.gate, args.base, args.adapters, args.blends, args.out)
    except (ConfigError, StageInputError, ModelNotFoundError) as exc:
        print(f"register: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"register: {result['verdict']}")
    print(f"  {result['model_uri']} -> {args.out}")


if __name__ == "__main__":
    main()
