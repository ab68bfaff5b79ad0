"""Prefect flows against the tiny-settings clone of the DAG, under one session-scoped test harness."""

from __future__ import annotations

import json

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture()
def in_clone(tiny_dag_project, monkeypatch):
    monkeypatch.setenv("STUNNING_ROOT", str(tiny_dag_project))
    monkeypatch.chdir(tiny_dag_project)
    return tiny_dag_project


def test_phase_flow_runs_its_stage_and_reports_it(prefect_harness, in_clone):
    from flows.phases import documentation

    summary = documentation()
    assert summary["phase"] == "documentation"
    # The clone is up to date, so DVC checks docs and its upstream stages and runs none.
    assert "docs" in summary["skipped"] and summary["ran"] == []


def test_nightly_with_nothing_changed_does_nothing(prefect_harness, in_clone):
    from flows.nightly import nightly_retrain

    outcome = nightly_retrain()
    assert outcome["outcome"] == "nothing-to-do"


def test_nightly_blocks_a_regressing_candidate_and_keeps_champion(prefect_harness, in_clone):
    from flows.nightly import nightly_retrain

    before = json.loads((in_clone / "reports/registry.json").read_text())
    params_path = in_clone / "params.yaml"
    original = params_path.read_text()
    try:
        params = yaml.safe_load(original)
        params["budgets"]["max_latency_s"] = 1e-6  # no candidate can meet this budget
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        outcome = nightly_retrain()
    finally:
        params_path.write_text(original)
    assert outcome["outcome"] == "blocked"
    assert any("latency" in r for r in outcome["reasons"]), outcome
    after = json.loads((in_clone / "reports/registry.json").read_text())
    assert after["promoted"] is False
    assert after["champion_version"] == before["champion_version"]
