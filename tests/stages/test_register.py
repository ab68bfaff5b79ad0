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


def test_register_under_dvc_exp_run_does_not_promote_and_champion_stage_records_it(
    store, candidate, tiny_base, monkeypatch, capsys
):
    from stages import champion, register
    from stunning.config import RegistryConfig
    from stunning.registry import aliases

    monkeypatch.chdir(store)
    Path("params-exp.yaml").write_text(yaml.safe_dump({"registry": {"model_name": "m-exp-stage"}}))
    Path("reports").mkdir(exist_ok=True)
    Path("reports/gate-exp.json").write_text(json.dumps(gate_report(True)))
    argv = ["--params", "params-exp.yaml", "--gate", "reports/gate-exp.json", "--base", str(tiny_base),
            "--adapters", str(candidate["adapters"]), "--blends", str(candidate["blends"]),
            "--out", "reports/registry-exp.json"]
    record_argv = ["--params", "params-exp.yaml", "--adapters", str(candidate["adapters"]), "--out", "reports/champion-exp.json"]
    champion.main(record_argv)
    assert json.loads(Path("reports/champion-exp.json").read_text())["version"] is None
    monkeypatch.setenv("DVC_EXP_NAME", "exp-rank8")  # what `dvc exp run` sets in a stage's environment
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0" * 40)
    register.main(argv)
    assert "REGISTERED v1, not promoted: DVC experiment 'exp-rank8'" in capsys.readouterr().out
    report = json.loads(Path("reports/registry-exp.json").read_text())
    assert report["promoted"] is False and report["experiment"] == "exp-rank8" and report["gate_passed"] is True
    assert aliases(RegistryConfig(model_name="m-exp-stage"), store) == {}
    before = Path("reports/champion-exp.json").read_bytes()
    champion.main(record_argv)
    assert Path("reports/champion-exp.json").read_bytes() == before  # no champion moved: same bytes

    monkeypatch.delenv("DVC_EXP_NAME")
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")
    register.main(argv)  # the pipeline's own run promotes
    assert json.loads(Path("reports/registry-exp.json").read_text())["promoted"] is True
    champion.main(record_argv)  # the candidate is the champion now: validated against "none", unchanged
    assert Path("reports/champion-exp.json").read_bytes() == before


def test_register_promotes_only_over_the_champion_the_gate_compared_against(store, tiny_base, monkeypatch, capsys, tmp_path):
    """`--champion reports/champion.json` names the champion validate compared against; when
    another machine promoted since, the candidate is registered, not promoted (exit 0)."""
    from stages import register
    from stunning.config import RegistryConfig
    from stunning.registry import aliases

    monkeypatch.chdir(store)
    Path("params-cas.yaml").write_text(yaml.safe_dump({"registry": {"model_name": "m-cas-stage"}}))
    Path("reports").mkdir(exist_ok=True)
    Path("reports/gate-cas.json").write_text(json.dumps(gate_report(True)))
    record = Path("reports/champion-cas.json")
    record.write_text(json.dumps({"model_name": "m-cas-stage", "version": None}))

    def argv(tag: str) -> list[str]:
        cand = make_registry_candidate(tmp_path / tag)
        (cand["adapters"] / "noir" / "pytorch_lora_weights.safetensors").write_bytes(tag.encode())
        return ["--params", "params-cas.yaml", "--gate", "reports/gate-cas.json", "--base", str(tiny_base),
                "--adapters", str(cand["adapters"]), "--blends", str(cand["blends"]),
                "--out", "reports/registry-cas.json", "--champion", str(record)]

    register.main(argv("first"))  # gated against no champion, and there is none: promoted
    assert "PROMOTED v1" in capsys.readouterr().out
    register.main(argv("second"))  # gated against no champion, but v1 is champion now
    out = capsys.readouterr().out
    assert "REGISTERED v2, not promoted: promotion: lost race to version 1" in out
    report = json.loads(Path("reports/registry-cas.json").read_text())
    assert report["promoted"] is False and report["lost_race_to"] == 1 and report["expected_champion"] is None
    assert aliases(RegistryConfig(model_name="m-cas-stage"), store) == {"champion": 1}

    record.write_text(json.dumps({"model_name": "other-model", "version": 1}))
    with pytest.raises(SystemExit) as exc:
        register.main(argv("third"))
    assert exc.value.code == 2 and "other-model" in capsys.readouterr().err


def test_compared_champion_comes_from_the_record_else_the_gate_report(tmp_path):
    from stages.register import compared_champion

    gate = {"passed": True, "candidate": {"champion_source": "m v7 (reports/champion.json)"}}
    assert compared_champion(gate, None, "m") == (True, 7)
    assert compared_champion({"candidate": {"champion_source": "reports/champion.json: no champion"}}, None, "m") == (True, None)
    assert compared_champion({"candidate": {"champion_source": "registry m@champion"}}, None, "m") == (False, None)
    assert compared_champion({"candidate": {"champion_source": "other v7 (x)"}}, None, "m") == (False, None)
    assert compared_champion({}, None, "m") == (False, None)
    record = tmp_path / "champion.json"
    record.write_text(json.dumps({"model_name": "m", "version": 3}))
    assert compared_champion(gate, record, "m") == (True, 3)  # the record wins
