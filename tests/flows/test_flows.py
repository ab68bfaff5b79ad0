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


def test_the_pipeline_starts_at_the_first_phase_with_an_out_of_date_stage():
    from flows.phases import PHASES
    from flows.pipeline import first_phase

    assert list(PHASES)[first_phase(["validate"])] == "validation"
    assert first_phase(["docs", "train"]) == 4  # the earliest wins
    assert first_phase(["ingest"]) == 2 and first_phase([]) == 0 and first_phase(["unknown"]) == 0


def test_nightly_outcome_is_tonights_only():
    """Pure: a report on disk from an earlier night is not tonight's outcome."""
    from flows.nightly import decide_outcome, out_of_date

    old = {"promoted": True, "version": 3, "reasons": []}
    outcome = decide_outcome(["docs"], old, register_ran=False)
    assert outcome["outcome"] == "no-candidate" and "version" not in outcome
    assert "did not run" in outcome["reasons"][0]
    assert decide_outcome(["train"], old, register_ran=True)["outcome"] == "promoted"
    held = {"promoted": False, "gate_passed": True, "version": 4, "not_promoted_reasons": ["gate.mode is dry_run"]}
    assert decide_outcome(["train"], held)["outcome"] == "not-promoted"
    assert out_of_date({"champion": ["always changed"], "docs": [{"changed deps": {}}]}) == ["docs"]


def test_nightly_reports_no_candidate_when_register_did_not_run(prefect_harness, in_clone):
    import sys

    from flows.nightly import nightly_retrain
    from tests.factories import run_in

    run_in(in_clone, sys.executable, "-m", "dvc", "repro")  # earlier tests may leave stages stale
    card = in_clone / "stunning" / "model_card.py"
    original = card.read_text()
    try:
        card.write_text(original + "\n# touched by a test: only docs and handoff rerun\n")
        outcome = nightly_retrain()
    finally:
        card.write_text(original)
    assert outcome["outcome"] == "no-candidate", outcome
    assert "register" not in outcome["changed"] and "docs" in outcome["changed"]


def test_a_new_champion_reruns_validate(in_clone):
    """`stunning promote` moves @champion outside the DAG: the champion record changes, so DVC
    sees validate out of date; rolling back restores the record byte for byte."""
    import sys

    from stunning.config import load_params
    from stunning.registry import register_candidate
    from tests.factories import gate_report, make_registry_candidate, run_in

    params = load_params(in_clone / "params.yaml")
    record = in_clone / "reports" / "champion.json"
    before = record.read_bytes()
    other = make_registry_candidate(in_clone.parent / "other-candidate")
    reg = register_candidate(params.registry, gate_report(True), other, in_clone / "models" / "embedded",
                             params.base.family, {}, root=in_clone, experiment="exp-test")
    assert reg["promoted"] is False
    run_in(in_clone, sys.executable, "-m", "dvc", "repro", "--single-item", "champion")
    assert record.read_bytes() == before  # registering an experiment moves nothing
    run_in(in_clone, sys.executable, "-m", "stunning.cli", "promote", str(reg["version"]))
    try:
        run_in(in_clone, sys.executable, "-m", "dvc", "repro", "--single-item", "champion")
        assert json.loads(record.read_text())["version"] == reg["version"]
        changed = json.loads(run_in(in_clone, sys.executable, "-m", "dvc", "status", "--json").stdout or "{}")
        assert "validate" in changed, changed
    finally:
        run_in(in_clone, sys.executable, "-m", "stunning.cli", "rollback", "--reason", "test")
        run_in(in_clone, sys.executable, "-m", "dvc", "repro", "--single-item", "champion")
    assert record.read_bytes() == before


def test_nightly_blocks_a_regressing_candidate_and_keeps_champion(prefect_harness, tiny_dag_project, tmp_path,
                                                                   monkeypatch):
    """In a copy of the clone: the budget change reruns validate and what follows, and putting
    it back would rerun them again for the next test of the shared clone."""
    import shutil

    from flows.nightly import nightly_retrain

    clone = tmp_path / "clone"
    shutil.copytree(tiny_dag_project, clone, symlinks=True)
    monkeypatch.setenv("STUNNING_ROOT", str(clone))
    monkeypatch.chdir(clone)
    before = json.loads((clone / "reports/registry.json").read_text())
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["budgets"]["max_latency_s"] = 1e-6  # no candidate can meet this budget
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    outcome = nightly_retrain()
    assert outcome["outcome"] == "blocked"
    assert any("latency" in r for r in outcome["reasons"]), outcome
    after = json.loads((clone / "reports/registry.json").read_text())
    assert after["promoted"] is False
    assert after["champion_version"] == before["champion_version"]
