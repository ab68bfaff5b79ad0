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


# --------------------------------------------------------------------------- promotion policy


def _other_candidate(root: Path, tag: str) -> dict[str, Path]:
    """Adapters with content of their own (`tag` in the weight bytes)."""
    cand = make_registry_candidate(root)
    for style in ("impressionist", "noir"):
        (cand["adapters"] / style / "pytorch_lora_weights.safetensors").write_bytes(f"{tag}-{style}".encode())
    return cand


def test_promotion_decision_by_mode_experiment_and_rollback():
    from stunning.registry import RegistryError, promotion_decision

    assert promotion_decision(True) == (True, [])
    assert promotion_decision(False) == (False, [])
    promote, why = promotion_decision(True, "dry_run")
    assert promote is False and "dry_run" in why[0]
    promote, why = promotion_decision(False, "disabled")
    assert promote is False and "disabled" in why[0]
    promote, why = promotion_decision(True, experiment="exp-rank8")
    assert promote is False and "exp-rank8" in why[0] and "stunning promote" in why[0]
    assert promotion_decision(True, experiment="exp-rank8", promote_experiments=True) == (True, [])
    promote, why = promotion_decision(True, rolled_back_versions=[3])
    assert promote is False and "rolled-back v3" in why[0]
    with pytest.raises(RegistryError, match="gate.mode"):
        promotion_decision(True, "sometimes")


def test_dry_run_and_disabled_gates_register_but_never_promote(store, candidate, tiny_base):
    from stunning.registry import aliases, version_tags

    cfg = RegistryConfig(model_name="m-modes")
    dry = _register(store, candidate, tiny_base, "m-modes", True, mode="dry_run")
    assert dry["promoted"] is False and dry["gate_passed"] is True and dry["champion_version"] is None
    assert dry["verdict"].startswith("REGISTERED v1, not promoted: gate.mode is dry_run")
    tags = version_tags(cfg, 1, store)
    assert tags["dry_run"] == "true" and tags["gate"] == "passed" and tags["promoted"] == "false"
    off = _register(store, candidate, tiny_base, "m-modes", False, mode="disabled",
                    gate={**gate_report(False, reasons=["gate.mode is disabled"]), "checks": []})
    assert off["promoted"] is False and version_tags(cfg, 2, store)["gate"] == "disabled"
    assert aliases(cfg, store) == {}


def test_experiment_is_registered_not_promoted_until_stunning_promote(store, candidate, tiny_base, tmp_path):
    from typer.testing import CliRunner

    from stunning.cli import app
    from stunning.registry import RegistryError, aliases, champion_metrics, promote, version_tags

    cfg = RegistryConfig(model_name="m-exp")
    _register(store, candidate, tiny_base, "m-exp", True)  # v1: champion
    exp = _register(store, _other_candidate(tmp_path / "c2", "rank8"), tiny_base, "m-exp", True,
                    gate=gate_report(True, gain=0.2), experiment="exp-rank8")
    assert exp["version"] == 2 and exp["promoted"] is False and exp["champion_version"] == 1
    assert any("exp-rank8" in r for r in exp["reasons"])
    assert version_tags(cfg, 2, store)["experiment"] == "exp-rank8"
    assert aliases(cfg, store) == {"champion": 1}
    assert champion_metrics(cfg, store)["style_gain/impressionist"] == 0.4  # still compared with v1
    _register(store, candidate, tiny_base, "m-exp", False, gate=gate_report(False, gain=0.01))  # v3: failed
    with pytest.raises(RegistryError, match="gate did not pass"):
        promote(cfg, 3, root=store)

    # `stunning promote VERSION` (the CLI on the project's params)
    (store / "params-exp.yaml").write_text("registry:\n  model_name: m-exp\n")
    runner = CliRunner()
    refused = runner.invoke(app, ["promote", "3", "--params", str(store / "params-exp.yaml")])
    assert refused.exit_code == 2 and "gate did not pass" in refused.output
    done = runner.invoke(app, ["promote", "2", "--params", str(store / "params-exp.yaml")])
    assert done.exit_code == 0, done.output
    assert "PROMOTED v2 to @champion (previous v1 kept as @previous-champion)" in done.output
    assert aliases(cfg, store) == {"champion": 2, "previous-champion": 1}
    assert version_tags(cfg, 2, store)["previous_champion_version"] == "1"


def test_rolled_back_content_is_not_promoted_again(store, candidate, tiny_base, tmp_path):
    from stunning.registry import aliases, rollback, version_tags

    cfg = RegistryConfig(model_name="m-rerun")
    _register(store, candidate, tiny_base, "m-rerun", True)  # v1
    bad = _other_candidate(tmp_path / "bad", "bad")
    assert _register(store, bad, tiny_base, "m-rerun", True)["promoted"] is True  # v2
    rollback(cfg, root=store, reason="noir artefacts")
    assert aliases(cfg, store) == {"champion": 1}
    # the retrain reproduces the rolled-back weights: registered, not promoted over the rollback
    again = _register(store, bad, tiny_base, "m-rerun", True)
    assert again["version"] == 3 and again["promoted"] is False and again["rolled_back_same_content"] == [2]
    assert any("rolled-back v2" in r for r in again["reasons"])
    assert again["content_hash"] == version_tags(cfg, 2, store)["content_hash"]
    assert aliases(cfg, store) == {"champion": 1}
    # different weights are promoted as usual
    fresh = _register(store, _other_candidate(tmp_path / "fresh", "fresh"), tiny_base, "m-rerun", True)
    assert fresh["promoted"] is True and aliases(cfg, store)["champion"] == 4


def test_champion_record_is_deterministic_and_follows_the_champion(store, candidate, tiny_base, tmp_path):
    from stunning.registry import champion_record, content_hash, promote

    cfg = RegistryConfig(model_name="m-record")
    assert champion_record(cfg, store)["version"] is None
    first = _register(store, candidate, tiny_base, "m-record", True)  # v1
    own = content_hash(candidate["adapters"])
    assert first["content_hash"] == own
    # the candidate just promoted is the champion: it was validated against "none", and still is
    assert champion_record(cfg, store, candidate_hash=own)["version"] is None
    record = champion_record(cfg, store)
    assert record == champion_record(cfg, store)  # no timestamps: same registry, same record
    assert record["version"] == 1 and record["content_hash"] == own
    assert record["metrics"]["style_gain/noir"] == 0.3 and Path(record["adapters"]).is_dir()
    other = _other_candidate(tmp_path / "other", "other")
    _register(store, other, tiny_base, "m-record", True, experiment="exp")  # v2, not promoted
    assert champion_record(cfg, store) == record  # registering alone does not change it
    promote(cfg, 2, root=store)
    moved = champion_record(cfg, store, candidate_hash=own)
    assert moved["version"] == 2 and moved != record


def test_interrupted_registration_is_finished_not_duplicated(store, candidate, tiny_base, tmp_path):
    """A register killed after its version was created (before tags and aliases were done)
    leaves a `pending` version: the rerun with the same candidate and gate report finishes
    that version (same number as an uninterrupted run); a pending version of another
    candidate is marked abandoned and never promoted."""
    from mlflow import MlflowClient

    from stunning.registry import RegistryError, aliases, promote, version_tags

    name = "m-interrupted"
    cfg = RegistryConfig(model_name=name)
    first = _register(store, candidate, tiny_base, name, True)
    assert first["version"] == 1 and version_tags(cfg, 1, store)["registration"] == "complete"
    other = _register(store, _other_candidate(tmp_path / "other", "other"), tiny_base, name, True)
    fresh = _register(store, _other_candidate(tmp_path / "fresh", "fresh"), tiny_base, name, True)
    client = MlflowClient()
    # the state a kill -9 leaves between creating the version and finishing it
    for v in (other["version"], fresh["version"]):
        client.set_model_version_tag(name, str(v), "registration", "pending")
        client.delete_model_version_tag(name, str(v), "promoted")
    client.set_registered_model_alias(name, "champion", "1")
    client.delete_registered_model_alias(name, "previous-champion")
    assert aliases(cfg, store) == {"champion": 1}

    again = _register(store, _other_candidate(tmp_path / "fresh2", "fresh"), tiny_base, name, True)
    assert again["version"] == fresh["version"] == 3 and again["promoted"] is True
    assert again["run_id"] == fresh["run_id"]
    assert aliases(cfg, store) == {"champion": 3, "previous-champion": 1}
    assert version_tags(cfg, 3, store)["registration"] == "complete"
    assert version_tags(cfg, 2, store)["registration"] == "abandoned"
    assert "interrupted" in client.get_model_version(name, "2").description
    with pytest.raises(RegistryError, match="interrupted"):
        promote(cfg, 2, root=store)
    # a different gate report is a different registration: a new version
    changed = _register(store, _other_candidate(tmp_path / "fresh3", "fresh"), tiny_base, name, True,
                        gate=gate_report(True, gain=0.5))
    assert changed["version"] == 4


# --------------------------------------------------------------------------- compare-and-set promotion


def test_champion_moved_since_the_gate_means_registered_not_promoted(store, candidate, tiny_base, tmp_path):
    """The gate compared against v1, but another run promoted v2 meanwhile: the candidate is
    registered (complete) and not promoted, saying it lost the race to v2."""
    from stunning.registry import aliases, version_tags

    name = "m-cas"
    cfg = RegistryConfig(model_name=name)
    _register(store, candidate, tiny_base, name, True)  # v1: the champion the gate compared against
    _register(store, _other_candidate(tmp_path / "winner", "winner"), tiny_base, name, True)  # v2 won meanwhile
    late = _register(store, _other_candidate(tmp_path / "late", "late"), tiny_base, name, True, expected_champion=1)
    assert late["version"] == 3 and late["promoted"] is False and late["lost_race_to"] == 2
    assert late["verdict"].startswith("REGISTERED v3, not promoted: promotion: lost race to version 2 (the gate "
                                      "compared against v1;")
    assert late["verdict"].endswith("@champion stays v2")
    assert aliases(cfg, store) == {"champion": 2, "previous-champion": 1}
    tags = version_tags(cfg, 3, store)
    assert tags["promotion"].startswith("lost race to version 2") and tags["promoted"] == "false"
    assert tags["registration"] == "complete" and "lost race" in tags["not_promoted_reason"]
    # gated against the champion that is still there: promoted
    ok = _register(store, _other_candidate(tmp_path / "ok", "ok"), tiny_base, name, True, expected_champion=2)
    assert ok["promoted"] is True and ok["lost_race_to"] is None and aliases(cfg, store)["champion"] == 4
    # gated against "no champion" while there is one: not promoted
    none = _register(store, _other_candidate(tmp_path / "none", "none"), tiny_base, name, True, expected_champion=None)
    assert none["promoted"] is False and "the gate compared against no champion" in none["verdict"]


def test_rerun_of_the_promoted_candidate_is_not_a_lost_race(store, candidate, tiny_base):
    """The champion record skips a champion with the candidate's own content (it was just
    promoted), so the expected champion of a rerun is the one before it: still promoted."""
    name = "m-cas-rerun"
    _register(store, candidate, tiny_base, name, True)  # v1 = the candidate's content, gated against none
    again = _register(store, candidate, tiny_base, name, True, expected_champion=None)
    assert again["promoted"] is True and again["lost_race_to"] is None


def test_promote_and_rollback_refuse_when_the_champion_is_not_the_expected_one(store, candidate, tiny_base, tmp_path):
    from typer.testing import CliRunner

    from stunning.cli import app
    from stunning.registry import RegistryError, aliases, promote, rollback

    name = "m-cas-hand"
    cfg = RegistryConfig(model_name=name)
    _register(store, candidate, tiny_base, name, True)  # v1
    _register(store, _other_candidate(tmp_path / "b", "b"), tiny_base, name, True)  # v2 champion
    _register(store, _other_candidate(tmp_path / "c", "c"), tiny_base, name, True, experiment="exp")  # v3
    with pytest.raises(RegistryError, match="@champion is v2, not v1 as expected"):
        promote(cfg, 3, root=store, expected_champion=1)
    with pytest.raises(RegistryError, match="@champion is v2, not v3 as expected"):
        rollback(cfg, root=store, expected_champion=3)
    assert aliases(cfg, store) == {"champion": 2, "previous-champion": 1}  # nothing changed

    (store / "params-cas.yaml").write_text(f"registry:\n  model_name: {name}\n")
    params = ["--params", str(store / "params-cas.yaml")]
    refused = CliRunner().invoke(app, ["rollback", *params, "--expect-champion", "1"])
    assert refused.exit_code == 2 and "not v1 as expected" in refused.output
    done = CliRunner().invoke(app, ["promote", "3", *params, "--expect-champion", "2"])
    assert done.exit_code == 0 and "PROMOTED v3" in done.output, done.output
    assert rollback(cfg, root=store, expected_champion=3)["champion_version"] == 2


def test_promotion_lock_waits_for_the_holder_and_breaks_a_stale_one(store):
    from mlflow import MlflowClient

    from stunning.registry import LOCK_SUFFIX, PromotionLockTimeout, promotion_lock
    from stunning.tracking import configure_mlflow

    name = "m-lock"
    configure_mlflow(RegistryConfig(model_name=name), store)
    client = MlflowClient()
    with promotion_lock(client, name) as token:
        assert client.get_registered_model(name + LOCK_SUFFIX).tags["token"] == token
        with pytest.raises(PromotionLockTimeout, match="held the registry's promotion lock"):
            with promotion_lock(client, name, wait_s=0.3, poll_s=0.05):
                pass
    assert name + LOCK_SUFFIX not in [m.name for m in client.search_registered_models()]  # released

    # a holder that crashed leaves its lock: broken once seen unchanged for the TTL
    client.create_registered_model(name + LOCK_SUFFIX, tags={"token": "dead", "holder": "gone:1", "expires": "9e12"})
    with promotion_lock(client, name, ttl_s=0.3, poll_s=0.05) as token:
        assert client.get_registered_model(name + LOCK_SUFFIX).tags["token"] == token != "dead"
    # ... or at once when its declared expiry is long past
    client.create_registered_model(name + LOCK_SUFFIX, tags={"token": "old", "holder": "gone:2", "expires": "1"})
    with promotion_lock(client, name, wait_s=0.1):
        pass
