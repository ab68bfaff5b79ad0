"""Stage `handoff` (phase 10): assemble the release bundle a user receives.

Only a model that passed the gate is handed off: the register stage's report
(`--registry-report`) says whether this run's candidate was promoted to `@champion`. If it
was, its adapters and blends (`--adapters`, `--blends`) go into the bundle; if not (the gate
blocked it, a dry run, an experiment), the current `@champion`'s adapters and blends are read
from the MLflow registry instead, and with no champion at all the stage refuses (exit 2)
rather than ship a blocked model. Copies those and the model card into `--out`, adds
`blends.yaml`, a runnable `example.py` (stock diffusers only), the deployment exports
(`--export`, build/export: Core ML, ONNX, the Swift template) under `export/`, `manifest.json`
(which model version it carries, and when that version was registered) and `SHA256SUMS`
(covering every file, the exports included), then verifies
the result. `stunning verify dist/release` re-checks it later.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stages._scaffold import parser, run_stage
from stunning.config import Params

log = logging.getLogger(__name__)


def released_model(params: Params, registry_report: Path, adapters: Path, blends: Path) -> tuple[Path, Path, dict, str]:
    """(adapters folder, blends folder, manifest `model` entry, created) of the model to hand off."""
    from stunning.bundle import BundleError
    from stunning.io import read_json
    from stunning.registry import NoChampionError, RegistryError, model_artifacts, resolve, version_created

    if not Path(registry_report).is_file():
        raise BundleError(f"{registry_report} not found: run the register stage first (`dvc repro register`).")
    report = read_json(registry_report)
    if report.get("promoted"):
        # `created`: when the register stage registered this version (None: SOURCE_DATE_EPOCH, else now).
        return adapters, blends, {"source": "candidate", "version": report.get("version")}, report.get("created")
    reasons = "; ".join(str(r) for r in report.get("reasons") or []) or "not promoted"
    try:
        version, folder = resolve(params.registry)
    except NoChampionError as exc:
        raise BundleError(
            f"the candidate (version {report.get('version')}) was not promoted ({reasons[:500]}) and there is no "
            f"@champion to hand off instead ({exc}). Fix what the gate reported (reports/gate.json) and re-run "
            "`dvc repro`; nothing was written."
        ) from None
    except RegistryError as exc:
        raise BundleError(f"reading the @champion to hand off: {exc}") from None
    arts = model_artifacts(folder)
    log.warning("the candidate (version %s) was not promoted (%s): handing off @champion version %d instead",
                report.get("version"), reasons[:200], version)
    model = {"source": "champion", "version": version, "candidate_version": report.get("version"),
             "candidate_not_promoted": reasons[:2000]}
    return arts["adapters"], arts["blends"], model, version_created(params.registry, version)


def run(params: Params, adapters: Path, blends: Path, model_card: Path, registry_report: Path, out: Path,
        export: Path | None = None) -> dict[str, Any]:
    """Build the bundle of the promoted model and verify it; a bundle that does not verify is an error."""
    from stunning.bundle import build_bundle, verify_bundle
    from stunning.model_card import base_model_id

    adapters, blends, model, created = released_model(params, registry_report, adapters, blends)
    if export is not None and model.get("source") != "candidate":
        # build/export holds this run's (unpromoted) fused model, not the champion's: not shipped.
        log.warning("not bundling %s: it exports the candidate, and the bundle carries @champion", export)
        model["exports_omitted"] = f"{export} exports the unpromoted candidate"
        export = None
    summary = build_bundle(out, adapters, blends, model_card, params, base_model=base_model_id(params),
                           model=model, created=created, export_dir=export)
    result = verify_bundle(out)
    if not result.ok:
        raise RuntimeError(f"the bundle just built does not verify:\n{result.describe()}")
    summary["verified"] = result.checked
    return summary


def _user_errors() -> tuple[type[Exception], ...]:
    from stunning.bundle import BundleError

    return (BundleError,)


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, "--adapters", "--blends", "--model-card", "--registry-report", "--out")
    ap.add_argument("--export", type=Path, default=None, help="the export stage's folder (dvc.yaml passes build/export)")
    run_stage(
        "handoff",
        ap,
        argv,
        run=lambda params, a: run(params, a.adapters, a.blends, a.model_card, a.registry_report, a.out, a.export),
        summary=lambda s, a: _print_summary(s),
        errors=_user_errors,
    )


def _print_summary(summary: dict[str, Any]) -> None:
    model = summary.get("model") or {}
    which = f"{model.get('source')} version {model.get('version')}" if model else "adapters"
    print(
        f"release bundle {summary['out']} ({which}): {summary['files']} files, {summary['bytes'] / 1e6:.1f} MB, "
        f"styles {', '.join(summary['styles'])}, blends {', '.join(summary['blends']) or 'none'}, "
        f"{summary.get('exports', 0)} export files; "
        f"{summary['verified']} checksums verified. Check later with `stunning verify {summary['out']}`."
    )


if __name__ == "__main__":
    main()
