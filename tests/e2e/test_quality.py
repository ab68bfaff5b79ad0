"""End to end, the quality run: `dvc repro` of the shipped defaults in a fresh clone trains
adapters that pass the gate, and the candidate becomes @champion (what `make run` promises)."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_default_run_trains_adapters_that_pass_the_gate_and_promotes_them(default_dag_project):
    """On the embedded default the base follows its prompts (held-out colour/garment pairs
    included), each adapter at least halves its content-matched style distance while the
    impressionist one keeps adherence within 10 points, and the candidate becomes @champion."""
    validation = json.loads((default_dag_project / "reports/validation.json").read_text())
    gate = json.loads((default_dag_project / "reports/gate.json").read_text())
    registry = json.loads((default_dag_project / "reports/registry.json").read_text())
    assert validation["variants"]["base"]["adherence"]["colour"] >= 0.8
    assert validation["readable_attributes"]["impressionist"]  # colour survives the impressionist style
    names = {c["name"] for c in gate["checks"]}
    assert {"style_gain/impressionist", "style_gain/noir", "adherence_drop/impressionist"} <= names
    for style in ("impressionist", "noir"):
        assert validation["style_gain"][style] >= 0.5, (style, validation["adapters"][style])
    assert validation["adherence_drop"]["impressionist"] <= 0.10
    assert gate["passed"], gate["reasons"]
    assert registry["promoted"] and registry["champion_version"] == registry["version"]
