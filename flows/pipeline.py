"""The full-pipeline flow: the ten phase flows in order, each a subflow in the Prefect UI.

When the project has a default DVC remote (a team remote: README, Team setup), the flow
pushes what it produced at the end, so a run on a worker machine is available to the
others with `dvc pull` once its `dvc.lock` is committed. Without one (the shipped
project) nothing is pushed."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from prefect import flow

from flows.dvc_runner import default_remote, project_root, transfer
from flows.phases import PHASE_FLOWS, PHASES


def first_phase(out_of_date: Iterable[str]) -> int:
    """Index of the first phase holding one of the `out_of_date` stages (`dvc status`); 0 if
    none is known. The phases before it are up to date: `dvc status` lists every stage whose
    own inputs changed, and the stages upstream of those did not."""
    stale = set(out_of_date)
    for i, stages in enumerate(PHASES.values()):
        if stale & set(stages):
            return i
    return 0


@flow(name="stunning-pipeline", log_prints=True)
def full_pipeline(out_of_date: list[str] | None = None) -> list[dict]:
    """Run every phase, or, given the stages `dvc status` found out of date, every phase from
    the first that holds one of them (each phase is a `dvc repro` process: the nightly run
    after a budget change starts at validation, not at research). DVC skips the stages whose
    inputs did not change."""
    start = first_phase(out_of_date) if out_of_date else 0
    results = [phase_flow() for phase_flow in PHASE_FLOWS[start:]]
    share_outputs()
    return results


def share_outputs(root: Path | None = None) -> str | None:
    """`dvc push` to the default remote, if one is set; returns DVC's summary line (printed:
    the flow's log in the Prefect UI)."""
    root = root or project_root()
    remote = default_remote(root)
    if remote is None:
        return None
    summary = transfer("push", root)
    print(f"DVC remote {remote!r}: {summary}")
    return summary


if __name__ == "__main__":
    full_pipeline()
