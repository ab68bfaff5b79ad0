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

Compare-and-set: `@champion` moves only if it still is the champion the gate compared
against — the version in `--champion` (`reports/champion.json`, what validate read), else
the one the gate report names (`candidate.champion_source`), else the one registered when
this stage starts. When another machine promoted in between, the candidate is registered,
not promoted (`promotion: lost race to version N`), and the stage still exits 0.
The registry may be local or a team's MLflow server (`registry.tracking_uri:
http://HOST:PORT`); nothing else changes.
"""

from __future__ import annotations

import json
import logging
import os
import re
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


def compared_champion(gate: dict[str, Any], champion_path: Path | None, model_name: str) -> tuple[bool, int | None]:
    """(known, version) of the champion the gate compared against (version None: none).

    From the `champion` stage's record `champion_path` if given, else from the gate report's
    `candidate.champion_source` as the validate stage writes it (`"<model> vN (<file>)"`,
    `"<file>: no champion"`, `"no champion"`); (False, None) when neither says.
    """
    if champion_path is not None:
        from stunning.io import read_json

        path = Path(champion_path)
        if not path.is_file():
            raise StageInputError(f"{path}: champion record not found; run the champion stage (`dvc repro champion`).")
        try:
            record = read_json(path)
        except ValueError as exc:
            raise StageInputError(f"{path}: not valid JSON ({exc}); rerun the champion stage.") from exc
        if not isinstance(record, dict) or "version" not in record:
            raise StageInputError(f"{path}: not a champion record (no 'version'); rerun the champion stage.")
        if record.get("model_name") not in (None, model_name):
            raise StageInputError(
                f"{path}: a record of model {record['model_name']!r}, but registry.model_name is {model_name!r}; "
                "rerun the champion stage."
            )
        version = record["version"]
        if version is not None and not (isinstance(version, int) and not isinstance(version, bool)):
            raise StageInputError(f"{path}: 'version' is {version!r}, not a version number; rerun the champion stage.")
        return True, version
    source = (gate.get("candidate") or {}).get("champion_source") if isinstance(gate.get("candidate"), dict) else None
    if isinstance(source, str):
        found = re.match(rf"{re.escape(model_name)} v(\d+) \(", source)
        if found:
            return True, int(found.group(1))
        if source == "no champion" or source.endswith(": no champion"):
            return True, None
    return False, None


def run(
    params: Params,
    gate_path: Path,
    base: Path,
    adapters: Path,
    blends: Path,
    out: Path,
    root: Path | None = None,
    champion_path: Path | None = None,
) -> dict[str, Any]:
    """Register the candidate per the gate verdict, write `out`, return the registry result."""
    gate = read_gate(gate_path)  # before importing MLflow, so a missing report fails fast
    known, expected = compared_champion(gate, champion_path, params.registry.model_name)

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
            **({"expected_champion": expected} if known else {}),
        )
    except RegistryError as exc:
        raise StageInputError(str(exc)) from exc
    write_json(Path(out), {**result, "tracking_uri": params.registry.tracking_uri, "gate_report": str(gate_path)})
    return result


def _user_errors() -> tuple[type[Exception], ...]:
    from stunning.families import ModelNotFoundError

    return (StageInputError, ModelNotFoundError)


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, "--gate", "--base", "--adapters", "--blends", "--out")
    ap.add_argument("--champion", type=Path, default=None,
                    help="the champion record the gate compared against (reports/champion.json): @champion moves "
                         "only if it still is that version")
    run_stage(
        "register",
        ap,
        argv,
        run=lambda params, a: run(params, a.gate, a.base, a.adapters, a.blends, a.out, champion_path=a.champion),
        summary=lambda result, a: print(f"register: {result['verdict']}\n  {result['model_uri']} -> {a.out}"),
        errors=_user_errors,
    )


if __name__ == "__main__":
    main()
