"""Nightly retrain: rerun what changed (DVC decides), validate, promote only through the gate.

The outcome — `nothing-to-do`, `promoted` or `blocked` with the gate's reasons — is the
flow run's final state message and a markdown artifact in the Prefect UI, and an MLflow run
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

from flows.dvc_runner import project_root, status
from flows.pipeline import full_pipeline


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


def decide_outcome(changed: list[str], registry_report: dict | None) -> dict:
    """Turn what DVC found changed and the register stage's report into one outcome."""
    if not changed:
        return {"outcome": "nothing-to-do", "changed": [], "reasons": ["all stages up to date"]}
    if registry_report is None:
        return {"outcome": "blocked", "changed": changed, "reasons": ["the register stage wrote no report"]}
    if registry_report.get("promoted"):
        return {"outcome": "promoted", "changed": changed, "version": registry_report.get("version"), "reasons": []}
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
    changed = sorted(status(root))
    registry_report = None
    if changed:
        logger.info("stages out of date: %s", ", ".join(changed))
        full_pipeline()
        path = root / "reports" / "registry.json"
        registry_report = json.loads(path.read_text()) if path.is_file() else None
    outcome = decide_outcome(changed, registry_report)
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
