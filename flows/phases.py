"""The ten phase flows. Each runs its DVC stages (and, through DVC, whatever upstream changed)."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.dvc_runner import ReproResult, project_root, repro
from flows.fanout import fan_out, train_path

# Phase → DVC stages, in DAG order. The names match dvc.yaml.
PHASES: dict[str, list[str]] = {
    "research": ["research"],
    "environment": ["environment", "base_model"],
    "data-pipeline": ["sample_data", "ingest"],
    "dataset-curation": ["curate"],
    "training": ["train"],
    "merge-quantize": ["merge"],
    "validation": ["champion", "validate", "export"],
    "backend-integration": ["register"],
    "documentation": ["docs"],
    "user-handoff": ["handoff"],
}


# Stages DVC runs on every repro (`always_changed`): reported as ran only by their own phase.
ALWAYS_RUN = {"champion"}


def _run_phase(phase: str) -> dict:
    logger = get_run_logger()
    result: ReproResult = repro(PHASES[phase])
    result.ran = [s for s in result.ran if s not in ALWAYS_RUN or s in PHASES[phase]]
    for line in result.output.splitlines():
        if line.strip():
            logger.info(line)
    summary = {"phase": phase, "stages": PHASES[phase], "ran": result.ran, "skipped": result.skipped}
    create_markdown_artifact(
        key=f"phase-{phase}",
        markdown=(
            f"### {phase}\n\n| stage | outcome |\n|---|---|\n"
            + "".join(f"| {s} | {'ran' if s in result.ran else 'up to date'} |\n" for s in PHASES[phase])
        ),
        description=f"DVC outcome of phase {phase}",
    )
    return summary


@flow(name="1-research", log_prints=True)
def research() -> dict:
    return _run_phase("research")


@flow(name="2-environment", log_prints=True)
def environment() -> dict:
    return _run_phase("environment")


@flow(name="3-data-pipeline", log_prints=True)
def data_pipeline() -> dict:
    return _run_phase("data-pipeline")


@flow(name="4-dataset-curation", log_prints=True)
def dataset_curation() -> dict:
    return _run_phase("dataset-curation")


@flow(name="5-training", log_prints=True)
def training() -> dict:
    # On a worker with other workers online, styles train in parallel flow runs first; the
    # DVC stage then resumes each from its last checkpoint, carried back from the team's MLflow
    # server when the workers are other machines (flows/fanout.py).
    fanned = fan_out()
    if fanned:
        print(f"trained in parallel flow runs: {fanned.groups}")
        for c in fanned.carried:
            print(f"checkpoint of {c['style']} (step {c['step']}) from MLflow run {c['run_id']}: {c['outcome']}")
    summary = _run_phase("training")
    if fanned:
        for line in retrained_here(train_path(project_root(), "--metrics"), fanned.groups):
            print(line)
    return summary


def retrained_here(report: Path, groups: list[list[str]]) -> list[str]:
    """After a fan-out, the styles the train stage trained again itself (not resumed at their
    last step from a worker's checkpoint), each with the likely reason."""
    if not report.is_file():
        return []
    styles = json.loads(report.read_text()).get("styles", {})
    fanned = {s for group in groups for s in group}
    return [
        f"WARNING: {style} was trained again here (resumed at step {r.get('resumed_from_step')} of {r.get('steps')}): "
        f"no checkpoint from its worker matched this clone's fingerprint (another commit, params, base model or "
        f"curated data on the worker, or no team MLflow server to carry it; README, Training fan-out)"
        for style, r in styles.items()
        if style in fanned and r.get("resumed_from_step") != r.get("steps")
    ]


@flow(name="6-merge-quantize", log_prints=True)
def merge_quantize() -> dict:
    return _run_phase("merge-quantize")


@flow(name="7-validation", log_prints=True)
def validation() -> dict:
    return _run_phase("validation")


@flow(name="8-backend-integration", log_prints=True)
def backend_integration() -> dict:
    return _run_phase("backend-integration")


@flow(name="9-documentation", log_prints=True)
def documentation() -> dict:
    return _run_phase("documentation")


@flow(name="10-user-handoff", log_prints=True)
def user_handoff() -> dict:
    return _run_phase("user-handoff")


PHASE_FLOWS = [
    research,
    environment,
    data_pipeline,
    dataset_curation,
    training,
    merge_quantize,
    validation,
    backend_integration,
    documentation,
    user_handoff,
]
