"""Stage `register` (phase 8, backend): record the candidate in the MLflow model registry.

Every candidate becomes a new version of `registry.model_name`, tagged with the gate
verdict, reasons, checks and metrics; `@champion` moves to it only if the gate passed (the
replaced champion stays as `@previous-champion` for rollback). A blocked candidate is not
an error: the stage exits 0 either way and says which happened. Writes
`reports/registry.json` (the version, whether it was promoted, and where the aliases point).

It never promotes when `gate.mode` is `dry_run` (the version is tagged `dry_run=true`) or
`disabled`; nor under `dvc exp run` (DVC sets `DVC_EXP_NAME` / `DVC_EXP_BASELINE_REV` in a
stage's environment) unless `registry.promote_experiments` is true — `stunning promote
VERSION` promotes such a version by hand; nor a candidate whose adapter content equals a
rolled-back version's. The report's `reasons` say why.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from stages._scaffold import parser, run_stage
from stunning.config import Params

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


EXPERIMENT_ENV = ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")


def experiment_name(env: dict[str, str] | None = None) -> str | None:
    """The `dvc exp run` experiment this stage runs in (DVC's env vars), or None."""
    env = os.environ if env is None else env
    if env.get("DVC_EXP_NAME"):
        return env["DVC_EXP_NAME"]
    if env.get("DVC_EXP_BASELINE_REV"):
        return f"experiment on {env['DVC_EXP_BASELINE_REV'][:12]}"
    return None


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
            mode=gate.get("mode") or params.gate.mode,  # what validate did; params otherwise
            experiment=experiment_name(),
            promote_experiments=params.registry.promote_experiments,
        )
    except RegistryError as exc:
        raise StageInputError(str(exc)) from exc
    write_json(Path(out), {**result, "tracking_uri": params.registry.tracking_uri, "gate_report": str(gate_path)})
    return result


def _user_errors() -> tuple[type[Exception], ...]:
    from stunning.families import ModelNotFoundError

    return (StageInputError, ModelNotFoundError)


def main(argv: list[str] | None = None) -> None:
    run_stage(
        "register",
        parser(__doc__, "--gate", "--base", "--adapters", "--blends", "--out"),
        argv,
        run=lambda params, a: run(params, a.gate, a.base, a.adapters, a.blends, a.out),
        summary=lambda result, a: print(f"register: {result['verdict']}\n  {result['model_uri']} -> {a.out}"),
        errors=_user_errors,
    )


if __name__ == "__main__":
    main()
