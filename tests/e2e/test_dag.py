"""End to end: the whole DVC DAG in a temporary clone, then a no-op rerun and a param change."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from tests.factories import run_in

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXPECTED_OUTPUTS = [
    "reports/research.json",
    "reports/research.md",
    "reports/environment.json",
    "models/embedded/model_index.json",
    "reports/ingest.json",
    "data/curated/manifest.csv",
    "reports/curate.json",
    "reports/data_validation.json",
    "reports/train.json",
    "reports/train_loss.csv",
    "reports/train_loss.png",
    "reports/merge.json",
    "reports/validation.json",
    "reports/validation/grid.png",
    "reports/gate.json",
    "reports/registry.json",
    "build/model_card/README.md",
    "dist/release/SHA256SUMS",
]


def test_full_dag_produces_every_phase_output(project_clone):
    missing = [p for p in EXPECTED_OUTPUTS if not (project_clone / p).exists()]
    assert not missing, f"missing outputs: {missing}\n{(project_clone / 'repro.log').read_text()[-3000:]}"
    for style in ("impressionist", "noir"):
        assert (project_clone / "models/adapters" / style / "pytorch_lora_weights.safetensors").is_file()
    ingest = json.loads((project_clone / "reports/ingest.json").read_text())
    # The sample set ships deliberately bad files: each must be reported, none may crash.
    assert ingest["rejected"] >= 4 and len(ingest["rejections"]) == ingest["rejected"]
    gate = json.loads((project_clone / "reports/gate.json").read_text())
    registry = json.loads((project_clone / "reports/registry.json").read_text())
    assert registry["promoted"] == gate["passed"]


def test_default_run_trains_adapters_that_pass_the_gate_and_promotes_them(project_clone):
    """On the embedded default the base follows its prompts (held-out colour/garment pairs
    included), each adapter at least halves its content-matched style distance while the
    impressionist one keeps adherence within 10 points, and the candidate becomes @champion."""
    validation = json.loads((project_clone / "reports/validation.json").read_text())
    gate = json.loads((project_clone / "reports/gate.json").read_text())
    registry = json.loads((project_clone / "reports/registry.json").read_text())
    assert validation["variants"]["base"]["adherence"]["colour"] >= 0.8
    assert validation["readable_attributes"]["impressionist"]  # colour survives the impressionist style
    names = {c["name"] for c in gate["checks"]}
    assert {"style_gain/impressionist", "style_gain/noir", "adherence_drop/impressionist"} <= names
    for style in ("impressionist", "noir"):
        assert validation["style_gain"][style] >= 0.5, (style, validation["adapters"][style])
    assert validation["adherence_drop"]["impressionist"] <= 0.10
    assert gate["passed"], gate["reasons"]
    assert registry["promoted"] and registry["champion_version"] == registry["version"]


def test_second_repro_does_nothing(project_clone):
    proc = run_in(project_clone, sys.executable, "-m", "dvc", "repro")
    out = proc.stdout + proc.stderr
    assert "Running stage" not in out, out
    status = run_in(project_clone, sys.executable, "-m", "dvc", "status", "--json")
    assert json.loads(status.stdout or "{}") == {}


def test_param_change_reruns_only_dependents(project_clone, tmp_path):
    params_path = project_clone / "params.yaml"
    original = params_path.read_text()
    try:
        params = yaml.safe_load(original)
        params["budgets"]["max_latency_s"] = 0.5 * params["budgets"]["max_latency_s"]
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        proc = run_in(project_clone, sys.executable, "-m", "dvc", "status", "--json")
        changed = set(json.loads(proc.stdout or "{}"))
        assert changed == {"validate"}, changed  # downstream stages follow once validate reruns
        dry = run_in(project_clone, sys.executable, "-m", "dvc", "repro", "--dry")
        ran = {line.split("'")[1] for line in dry.stdout.splitlines() if line.startswith("Running stage")}
        assert "train" not in ran and "curate" not in ran and "validate" in ran, dry.stdout
    finally:
        params_path.write_text(original)


def test_metrics_are_declared_for_dvc(project_clone):
    proc = run_in(project_clone, sys.executable, "-m", "dvc", "metrics", "show", "--json")
    shown = json.dumps(json.loads(proc.stdout))
    for name in ("train.json", "validation.json", "gate.json", "merge.json", "curate.json"):
        assert name in shown, name
