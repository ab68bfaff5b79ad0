"""The full-pipeline flow: the ten phase flows in order, each a subflow in the Prefect UI."""

from __future__ import annotations

from prefect import flow

from flows.phases import PHASE_FLOWS


@flow(name="stunning-pipeline", log_prints=True)
def full_pipeline() -> list[dict]:
    """Run every phase; DVC skips the stages whose inputs did not change."""
    return [phase_flow() for phase_flow in PHASE_FLOWS]


if __name__ == "__main__":
    full_pipeline()
