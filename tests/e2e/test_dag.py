"""End to end, the DAG's wiring: the whole DVC DAG on tiny settings in a temporary clone, then
a no-op rerun, a param change and the declared metrics.

Every stage, path, param and metric is the shipped one; only sizes are tiny
(`tests.factories.TINY_DAG_PARAMS`), so this runs on every change in about a minute. The
quality of the shipped defaults is tested in `test_quality.py`.
"""

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


def test_full_dag_produces_every_phase_output(tiny_dag_project):
    missing = [p for p in EXPECTED_OUTPUTS if not (tiny_dag_project / p).exists()]
    assert not missing, f"missing outputs: {missing}\n{(tiny_dag_project / 'repro.log').read_text()[-3000:]}"
    for style in ("impressionist", "noir"):
        assert (tiny_dag_project / "models/adapters" / style / "pytorch_lora_weights.safetensors").is_file()
    ingest = json.loads((tiny_dag_project / "reports/ingest.json").read_text())
    # The sample set ships deliberately bad files: each must be reported, none may crash.
    assert ingest["rejected"] >= 4 and len(ingest["rejections"]) == ingest["rejected"]
    gate = json.loads((tiny_dag_project / "reports/gate.json").read_text())
    registry = json.loads((tiny_dag_project / "reports/registry.json").read_text())
    assert registry["promoted"] == gate["passed"]


def test_second_repro_does_nothing(tiny_dag_project):
    proc = run_in(tiny_dag_project, sys.executable, "-m", "dvc", "repro")
    # `champion` reads the registry on every repro (always_changed); its record is unchanged,
    # so nothing downstream of it runs.
    out = (proc.stdout + proc.stderr).replace("Running stage 'champion'", "")
    assert "Running stage" not in out, out
    status = run_in(tiny_dag_project, sys.executable, "-m", "dvc", "status", "--json")
    assert {k: v for k, v in json.loads(status.stdout or "{}").items() if v != ["always changed"]} == {}


def test_param_change_reruns_only_dependents(tiny_dag_project, tmp_path):
    params_path = tiny_dag_project / "params.yaml"
    original = params_path.read_text()
    try:
        params = yaml.safe_load(original)
        params["budgets"]["max_latency_s"] = 0.5 * params["budgets"]["max_latency_s"]
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        proc = run_in(tiny_dag_project, sys.executable, "-m", "dvc", "status", "--json")
        changed = {k for k, v in json.loads(proc.stdout or "{}").items() if v != ["always changed"]}
        assert changed == {"validate"}, changed  # downstream stages follow once validate reruns
        dry = run_in(tiny_dag_project, sys.executable, "-m", "dvc", "repro", "--dry")
        ran = {line.split("'")[1] for line in dry.stdout.splitlines() if line.startswith("Running stage")}
        assert "train" not in ran and "curate" not in ran and "validate" in ran, dry.stdout
    finally:
        params_path.write_text(original)


def test_metrics_are_declared_for_dvc(tiny_dag_project):
    proc = run_in(tiny_dag_project, sys.executable, "-m", "dvc", "metrics", "show", "--json")
    shown = json.dumps(json.loads(proc.stdout))
    for name in ("train.json", "validation.json", "gate.json", "merge.json", "curate.json"):
        assert name in shown, name
