"""Stage `register`: registers the candidate, promotes or blocks it by the gate report, exits 0
either way (2 without a gate report), and writes the registry report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.factories import gate_report, make_registry_candidate, make_registry_store

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A project-like root whose registry database is created once for the module."""
    return make_registry_store(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def candidate(tmp_path_factory) -> dict[str, Path]:
    """Adapter and blend folders in the layout the train/merge stages write (the registry
    copies them; it does not read the weights)."""
    return make_registry_candidate(tmp_path_factory.mktemp("candidate"))


def test_register_stage_writes_report_and_exits_zero_when_blocked(store, candidate, tiny_base, monkeypatch, capsys):
    from stages import register

    monkeypatch.chdir(store)
    params = {"registry": {"model_name": "m-stage"}, "base": {"path": str(tiny_base)}}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    argv = [
        "--params",
        "params.yaml",
        "--gate",
        "reports/gate.json",
        "--base",
        str(tiny_base),
        "--adapters",
        str(candidate["adapters"]),
        "--blends",
        str(candidate["blends"]),
        "--out",
        "reports/registry.json",
    ]

    with pytest.raises(SystemExit) as exc:
        register.main(argv)
    assert exc.value.code == 2 and "validate" in capsys.readouterr().err  # no gate report yet

    Path("reports").mkdir()
    Path("reports/gate.json").write_text(json.dumps(gate_report(True)))
    register.main(argv)
    assert "PROMOTED v1 to @champion" in capsys.readouterr().out
    Path("reports/gate.json").write_text(json.dumps(gate_report(False, gain=0.01)))
    register.main(argv)
    out = capsys.readouterr().out
    assert "BLOCKED v2: style_gain/impressionist 0.01 < 0.05; @champion stays v1" in out
    report = json.loads(Path("reports/registry.json").read_text())
    assert report["version"] == 2 and report["promoted"] is False and report["champion_version"] == 1
    assert report["model_name"] == "m-stage"
