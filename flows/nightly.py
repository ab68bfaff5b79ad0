"""Nightly retrain: rerun what changed (DVC decides), validate, promote only through the gate.

The outcome — `nothing-to-do`, `promoted`, `not-promoted` (registered, but held back: a dry
run, an experiment, rolled-back content), `no-candidate` (the register stage did not run in
this flow run, so no earlier `reports/registry.json` is reported as tonight's) or `blocked`
with the gate's reasons — is the flow run's final state message and a markdown artifact in the Prefect UI, and an MLflow run
(experiment `nightly`, tag `outcome`) beside the training runs.

Serve it on a schedule (needs a running `prefect server start`):

    python -m flows.nightly --serve            # cron from params.yaml `nightly.cron`
"""

from __future__ import annotations

import argparse
import json

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from flows.dvc_runner import DvcError, project_root, repro, status
from flows.pipeline import full_pipeline

ALWAYS_CHANGED = ["always changed"]  # what `dvc status` says of an `always_changed` stage (champion)


def refresh_champion(root) -> None:
    """`dvc repro --single-item champion`: rewrite the champion record (nothing upstream), so
    that a champion moved since the last run (promote, rollback) shows as a change below."""
    if not (root / "models" / "adapters").exists():
        return  # a fresh clone: the whole pipeline is out of date anyway
    try:
        repro(["--single-item", "champion"], root)
    except DvcError as exc:
        get_run_logger().warning("could not refresh the champion record: %s", exc)


def out_of_date(changes: dict) -> list[str]:
    """Stages `dvc status` reports changed, less those whose only change is `always changed`."""
    return sorted(name for name, why in changes.items() if why != ALWAYS_CHANGED)


def _record_in_mlflow(outcome: dict) -> None:
    from stunning.config import RegistryConfig, load_params
    from stunning.tracking import MlflowTracker, configure_mlflow

    root = project_root()
    cfg: RegistryConfig = load_params(root / "params.yaml").registry
    configure_mlflow(cfg.model_copy(update={"experiment": "nightly"}), root=root)
    tracker = MlflowTracker()
    tracker.start_run("nightly-retrain", tags={"outcome": outcome["outcome"], "stage": "nightly"})
    tracker.set_tags({"reasons": "; ".join(outcome.get("reasons", []))[:5000], "changed": ",".join(outcome["changed"])})
    if outcome.get("version") is not None:
        tracker.set_tags({"model_version": str(outcome["version"])})
    tracker.end_run()


def decide_outcome(changed: list[str], registry_report: dict | None, register_ran: bool = True) -> dict:
    """Turn what DVC found changed and the register stage's report into one outcome.

    `register_ran`: whether the register stage ran in this flow run; if not, the report on
    disk is an earlier night's and is not read."""
    if not changed:
        return {"outcome": "nothing-to-do", "changed": [], "reasons": ["all stages up to date"]}
    if not register_ran:
        return {
            "outcome": "no-candidate",
            "changed": changed,
            "reasons": ["the register stage did not run tonight (no new candidate reached it); "
                        "@champion is unchanged and reports/registry.json is from an earlier run"],
        }
    if registry_report is None:
        return {"outcome": "blocked", "changed": changed, "reasons": ["the register stage wrote no report"]}
    if registry_report.get("promoted"):
        return {"outcome": "promoted", "changed": changed, "version": registry_report.get("version"), "reasons": []}
    if registry_report.get("gate_passed") and registry_report.get("not_promoted_reasons"):
        return {
            "outcome": "not-promoted",
            "changed": changed,
            "version": registry_report.get("version"),
            "reasons": list(registry_report["not_promoted_reasons"]),
        }
    return {
        "outcome": "blocked",
        "changed": changed,
        "version": registry_report.get("version"),
        "reasons": list(registry_report.get("reasons") or ["gate failed"]),
    }


@flow(name="nightly-retrain", log_prints=True)
def nightly_retrain():
    logger = get_run_logger()
    root = project_root()
    refresh_champion(root)
    changed = out_of_date(status(root))
    registry_report = None
    register_ran = False
    if changed:
        logger.info("stages out of date: %s", ", ".join(changed))
        phases = full_pipeline(changed)
        register_ran = any("register" in (p.get("ran") or []) for p in phases or [])
        path = root / "reports" / "registry.json"
        if register_ran and path.is_file():
            registry_report = json.loads(path.read_text())
    outcome = decide_outcome(changed, registry_report, register_ran)
    _record_in_mlflow(outcome)
    create_markdown_artifact(
        key="nightly-outcome",
        markdown=f"## Nightly retrain: **{outcome['outcome']}**\n\n"
        + (f"Changed stages: {', '.join(changed)}\n\n" if changed else "")
        + "".join(f"- {r}\n" for r in outcome["reasons"]),
        description="Outcome of the nightly retrain",
    )
    message = outcome["outcome"] + (": " + "; ".join(outcome["reasons"]) if outcome["reasons"] else "")
    return Completed(message=message[:1000], data=outcome)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Nightly retrain flow")
    ap.add_argument("--serve", action="store_true", help="serve the flow on its cron schedule")
    ap.add_argument("--cron", default=None, help="override params.yaml nightly.cron")
    args = ap.parse_args(argv)
    if args.serve:
        from stunning.config import load_params

        cron = args.cron or load_params(project_root() / "params.yaml").nightly.cron
        nightly_retrain.serve(name="nightly-retrain", cron=cron)
    else:
        print(nightly_retrain())


if __name__ == "__main__":
    main()
