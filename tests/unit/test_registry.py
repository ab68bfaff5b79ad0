"""The MLflow registry: versions, gate tags, @champion / @previous-champion, rollback.

One SQLite registry per module (creating one costs seconds); each test registers under its
own model name, so tests share the database but not their state.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stunning.config import RegistryConfig
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


def _register(store, candidate, base, name, passed, **kw):
    from stunning.registry import register_candidate

    cfg = RegistryConfig(model_name=name)
    gate = kw.pop("gate", None) or gate_report(passed)
    return register_candidate(cfg, gate, candidate, base, "sd-unet", {"train": {"rank": 4}}, root=store, **kw)


def test_no_database_means_no_champion_and_none_is_created(tmp_path):
    from stunning.registry import NoChampionError, aliases, champion_metrics, resolve, rollback

    cfg = RegistryConfig()
    assert champion_metrics(cfg, tmp_path) is None
    assert aliases(cfg, tmp_path) == {}
    with pytest.raises(NoChampionError, match="no MLflow registry"):
        resolve(cfg, root=tmp_path)
    with pytest.raises(NoChampionError):
        rollback(cfg, root=tmp_path)
    assert not (tmp_path / "mlruns").exists()


def test_passing_gate_registers_champion_with_tags_and_artifacts(store, candidate, tiny_base):
    from stunning.registry import aliases, champion_metrics, model_artifacts, resolve, version_tags

    result = _register(store, candidate, tiny_base, "m-pass", True)
    assert result["version"] == 1 and result["promoted"] is True
    assert result["champion_version"] == 1 and result["previous_champion_version"] is None
    assert result["verdict"] == "PROMOTED v1 to @champion (first champion)"
    assert result["styles"] == ["impressionist", "noir"] and result["blends"] == ["half-half"]
    cfg = RegistryConfig(model_name="m-pass")
    assert aliases(cfg, store) == {"champion": 1}

    tags = version_tags(cfg, 1, store)
    assert tags["gate"] == "passed" and tags["promoted"] == "true" and tags["gate_reasons"] == "none"
    assert tags["check.style_gain/impressionist"] == "0.4/0.05/pass"
    assert tags["check.peak_memory_mb"] == "none/4096/pass"
    assert float(tags["style_gain/noir"]) == 0.3

    metrics = champion_metrics(cfg, store)
    assert metrics == {"style_gain/impressionist": 0.4, "style_gain/noir": 0.3, "quant_mse": 0.002}

    version, model_dir = resolve(cfg, root=store)
    assert version == 1 and (model_dir / "MLmodel").is_file()
    arts = model_artifacts(model_dir)
    assert (arts["adapters"] / "noir/train_config.yaml").read_text() == "rank: 4\n"
    assert (arts["blends"] / "half-half/pytorch_lora_weights.safetensors").is_file()
    assert json.loads(arts["gate"].read_text())["checks"][0]["value"] == 0.4
    assert json.loads(arts["params"].read_text()) == {"train": {"rank": 4}}
    assert (arts["base"] / "model_index.json").is_file()
    manifest = json.loads(arts["manifest"].read_text())
    assert manifest["family"] == "sd-unet" and manifest["base"] == "artifact"


def test_failed_gate_is_registered_but_champion_stays(store, candidate, tiny_base):
    from stunning.registry import aliases, champion_metrics, version_tags

    cfg = RegistryConfig(model_name="m-fail")
    _register(store, candidate, tiny_base, "m-fail", True)  # v1: champion
    reasons = ["style_gain/impressionist 0.01 < 0.05", "x" * 6000]
    blocked = _register(store, candidate, tiny_base, "m-fail", False, gate=gate_report(False, gain=0.01, reasons=reasons))
    assert blocked["version"] == 2 and blocked["promoted"] is False
    assert blocked["champion_version"] == 1 and blocked["reasons"] == reasons
    assert blocked["verdict"].startswith("BLOCKED v2: style_gain/impressionist 0.01 < 0.05;")
    assert blocked["verdict"].endswith("@champion stays v1")
    assert aliases(cfg, store) == {"champion": 1}
    tags = version_tags(cfg, 2, store)
    assert tags["gate"] == "failed" and tags["promoted"] == "false"
    assert tags["gate_reasons"].startswith("style_gain/impressionist 0.01 < 0.05; xxx")
    assert len(tags["gate_reasons"]) <= 5000 and tags["gate_reasons"].endswith("(truncated)")
    assert tags["check.style_gain/impressionist"] == "0.01/0.05/fail"
    # The next gate compares with the champion (v1), not with the latest failed version.
    assert champion_metrics(cfg, store)["style_gain/impressionist"] == 0.4

    promoted = _register(store, candidate, tiny_base, "m-fail", True)
    assert promoted["version"] == 3 and promoted["previous_champion_version"] == 1
    assert promoted["verdict"] == "PROMOTED v3 to @champion (previous v1 kept as @previous-champion)"
    assert aliases(cfg, store) == {"champion": 3, "previous-champion": 1}
    assert version_tags(cfg, 1, store)["superseded_by"] == "3"


def test_rollback_walks_back_the_promotion_history(store, candidate, tiny_base):
    from stunning.registry import NoChampionError, aliases, rollback, version_tags

    cfg = RegistryConfig(model_name="m-rollback")
    for _ in range(3):
        _register(store, candidate, tiny_base, "m-rollback", True, base_copy_limit_mb=0)
    assert aliases(cfg, store) == {"champion": 3, "previous-champion": 2}

    first = rollback(cfg, root=store, reason="artefacts in the noir style")
    assert first == {
        "model_name": "m-rollback",
        "rolled_back_from": 3,
        "champion_version": 2,
        "previous_champion_version": 1,
        "reason": "artefacts in the noir style",
    }
    assert aliases(cfg, store) == {"champion": 2, "previous-champion": 1}
    tags = version_tags(cfg, 3, store)
    assert tags["rolled_back"] == "true" and tags["rollback_reason"] == "artefacts in the noir style"

    assert rollback(cfg, root=store)["champion_version"] == 1
    assert aliases(cfg, store) == {"champion": 1}
    with pytest.raises(NoChampionError, match="no @previous-champion"):
        rollback(cfg, root=store)


def test_large_base_is_referenced_by_path(store, candidate, tiny_base):
    from stunning.registry import model_artifacts, resolve, version_tags

    cfg = RegistryConfig(model_name="m-external")
    result = _register(store, candidate, tiny_base, "m-external", True, base_copy_limit_mb=0.001)
    assert result["base_bundled"] is False
    tags = version_tags(cfg, 1, store)
    assert tags["base"] == "external" and tags["base_path"] == str(tiny_base.resolve())
    arts = model_artifacts(resolve(cfg, root=store)[1])
    assert "base" not in arts
    assert json.loads(arts["manifest"].read_text())["base_path"] == str(tiny_base.resolve())


def test_bad_inputs_fail_before_touching_the_registry(tmp_path, candidate, tiny_base):
    from stunning.families import ModelNotFoundError
    from stunning.registry import RegistryError, register_candidate

    cfg = RegistryConfig()
    with pytest.raises(RegistryError, match="'passed'"):
        register_candidate(cfg, {"checks": []}, candidate, tiny_base, "sd-unet", {}, root=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="run the train stage"):
        register_candidate(cfg, gate_report(True), {"adapters": tmp_path / "empty"}, tiny_base, "sd-unet", {}, root=tmp_path)
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        register_candidate(cfg, gate_report(True), candidate, tmp_path / "nope", "sd-unet", {}, root=tmp_path)
    assert not (tmp_path / "mlruns").exists()


def test_gate_metrics_come_from_candidate_metrics_else_checks():
    from stunning.registry import gate_metrics

    gate = {
        "passed": True,
        "metrics": {"latency_s": 0.5, "nan": float("nan"), "flag": True},
        "checks": [{"name": "vs_champion/style_gain/noir", "value": 0.2}],
        "candidate": {"metrics": {"style_gain": {"impressionist": 1}}, "rank": 4},
    }
    assert gate_metrics(gate) == {"style_gain/impressionist": 1.0, "latency_s": 0.5}
    checks_only = {"passed": True, "checks": [{"name": "style_gain/noir", "value": 0.2}, {"name": "n", "value": "x"}]}
    assert gate_metrics(checks_only) == {"style_gain/noir": 0.2}
