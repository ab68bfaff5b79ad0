"""The registry against a real `mlflow server --serve-artifacts` on localhost.

The server's database is PostgreSQL where Debian's `postgresql` package and psycopg are
installed (a throwaway cluster on 127.0.0.1), else SQLite. One server for the module
(starting it costs seconds); each test registers under its own model name. The project
folders point at it only through `registry.tracking_uri`.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import yaml

from stunning.config import RegistryConfig
from tests.factories import (
    gate_report,
    make_registry_candidate,
    mlflow_server,
    postgres_database,
    register_tiny_champion,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(tracking URI, the server's folder): a real MLflow server for the module, on
    PostgreSQL when it is installed, else on SQLite."""
    home = tmp_path_factory.mktemp("server")
    with postgres_database() as database, mlflow_server(home, database) as uri:
        print(f"mlflow server {uri} on {'PostgreSQL' if database else 'SQLite'}")
        yield uri, home / "mlflow-server"


def _project(root: Path, uri: str, model_name: str) -> Path:
    """A project folder whose params.yaml points the registry at the server."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"registry": {"tracking_uri": uri, "model_name": model_name}}))
    return root


def _candidate(root: Path, tag: str) -> dict[str, Path]:
    cand = make_registry_candidate(root)
    for style in ("impressionist", "noir"):
        (cand["adapters"] / style / "pytorch_lora_weights.safetensors").write_bytes(f"{tag}-{style}".encode())
    return cand


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_register_stage_records_run_version_gate_tags_and_champion_on_the_server(server, tmp_path, tiny_base, capsys):
    from stages import register

    uri, home = server
    project = _project(tmp_path / "project", uri, "srv-stage")
    cand = make_registry_candidate(tmp_path / "cand")
    (project / "gate.json").write_text(json.dumps(gate_report(True)))
    argv = ["--params", str(project / "params.yaml"), "--gate", str(project / "gate.json"), "--base", str(tiny_base),
            "--adapters", str(cand["adapters"]), "--blends", str(cand["blends"]), "--out", str(project / "registry.json")]
    register.main(argv)
    assert "PROMOTED v1 to @champion" in capsys.readouterr().out

    client = _client(uri)
    model = client.get_registered_model("srv-stage")
    assert model.aliases == {"champion": "1"}
    mv = client.get_model_version("srv-stage", "1")
    assert mv.tags["gate"] == "passed" and mv.tags["registration"] == "complete" and mv.tags["promoted"] == "true"
    assert mv.tags["check.style_gain/impressionist"] == "0.4/0.05/pass"
    run = client.get_run(mv.run_id)
    assert run.data.tags["stage"] == "register" and run.data.metrics["style_gain/noir"] == 0.3
    # artifacts are served: the URIs are the server's, no client file path anywhere
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert client.get_model_version_download_uri("srv-stage", "1").startswith("mlflow-artifacts:/")
    assert str(project) not in json.dumps([run.info.artifact_uri, mv.source, client.get_experiment(run.info.experiment_id).artifact_location])
    assert list((home / "artifacts").rglob("MLmodel")) and list((home / "artifacts").rglob("gate.json"))
    assert not (project / "mlruns" / "mlflow.db").exists()  # nothing local but the report
    report = json.loads((project / "registry.json").read_text())
    assert report["tracking_uri"] == uri and report["promoted"] is True


def test_serve_loads_the_champion_from_the_server_and_rollback_moves_it(server, tmp_path, tiny_base):
    from fastapi.testclient import TestClient

    from stunning.registry import aliases, champion_record, register_candidate, resolve, rollback, version_tags
    from stunning.serve import ServeSettings, create_app

    uri, _ = server
    project = _project(tmp_path / "project", uri, "srv-serve")
    cfg = RegistryConfig(tracking_uri=uri, model_name="srv-serve")
    register_candidate(cfg, gate_report(True), make_registry_candidate(tmp_path / "cand"), tiny_base, "sd3", {},
                       root=project)  # v1: placeholder weights, the rollback target (never loaded)
    second = register_tiny_champion(project, tiny_base, "srv-serve", seed=1)  # v2: real LoRAs, promoted
    assert second["promoted"] is True and second["previous_champion_version"] == 1

    version, model_dir = resolve(cfg, root=project)
    assert version == 2 and (model_dir / "MLmodel").is_file()
    assert model_dir.is_relative_to(project / "mlruns" / "artifacts" / "downloads")  # the download cache
    assert resolve(cfg, root=project) == (2, model_dir)  # cached: same folder, nothing downloaded again
    record = champion_record(cfg, project)
    assert record["version"] == 2 and Path(record["adapters"]).is_relative_to(model_dir)

    settings = ServeSettings(auth=False, poll_seconds=0)
    with TestClient(create_app(None, cfg, root=project, device="cpu", settings=settings)) as c:
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["version"] == 2, health
        png = c.post("/generate", json={"prompt": "a red hat", "style": "noir", "seed": 1, "steps": 2})
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"

    done = rollback(cfg, root=project, reason="noir artefacts")
    assert done["rolled_back_from"] == 2 and done["champion_version"] == 1
    assert aliases(cfg, project) == {"champion": 1}
    assert version_tags(cfg, 2, project)["rollback_reason"] == "noir artefacts"
    assert resolve(cfg, root=project)[0] == 1


def _race(uri: str, root: str, base: str, cand: dict, gate: dict, expected: int, go, out) -> None:
    """One "machine": register `cand` into the server, gated against champion `expected`."""
    import logging

    logging.disable(logging.WARNING)
    from stunning.registry import register_candidate

    cfg = RegistryConfig(tracking_uri=uri, model_name="srv-race")
    go.wait()
    started = time.monotonic()
    try:
        result = register_candidate(cfg, gate, {k: Path(v) for k, v in cand.items()}, Path(base), "sd3", {},
                                    root=root, expected_champion=expected)
        out.put({**{k: result[k] for k in ("version", "promoted", "not_promoted_reasons", "lost_race_to")},
                 "seconds": time.monotonic() - started})
    except BaseException as exc:  # reported to the test, never a silent hang
        out.put({"error": repr(exc)})


def test_two_concurrent_promotions_have_exactly_one_winner(server, tmp_path, tiny_base):
    """Two processes ("machines") gated against the same champion v1 register at once: one
    moves @champion, the other is registered (complete) and not promoted, saying why."""
    from stunning.registry import aliases, register_candidate, version_tags

    uri, _ = server
    cfg = RegistryConfig(tracking_uri=uri, model_name="srv-race")
    project = _project(tmp_path / "project", uri, "srv-race")
    first = register_candidate(cfg, gate_report(True), _candidate(tmp_path / "c1", "one"), tiny_base, "sd3", {},
                               root=project)
    assert first["version"] == 1 and first["promoted"] is True

    ctx = multiprocessing.get_context("fork")  # both start from this process's imports: a fair start
    go, out = ctx.Barrier(2), ctx.Queue()
    procs = []
    for i, tag in enumerate(("two", "three")):
        cand = {k: str(v) for k, v in _candidate(tmp_path / f"c{i + 2}", tag).items()}
        p = ctx.Process(target=_race, args=(uri, str(project), str(tiny_base), cand, gate_report(True, gain=0.5), 1, go, out))
        p.start()
        procs.append(p)
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(30)
    assert not [r for r in results if "error" in r], results

    winners = [r for r in results if r["promoted"]]
    losers = [r for r in results if not r["promoted"]]
    assert len(winners) == 1 and len(losers) == 1, results
    win, lose = winners[0], losers[0]
    assert {win["version"], lose["version"]} == {2, 3}
    assert lose["lost_race_to"] == win["version"]
    assert any(f"promotion: lost race to version {win['version']}" in r for r in lose["not_promoted_reasons"])
    assert aliases(cfg, project) == {"champion": win["version"], "previous-champion": 1}
    tags = version_tags(cfg, lose["version"], project)
    assert tags["registration"] == "complete" and tags["promoted"] == "false"
    assert tags["promotion"].startswith(f"lost race to version {win['version']}")
    description = _client(uri).get_model_version("srv-race", str(lose["version"])).description
    assert description.startswith(f"REGISTERED v{lose['version']}, not promoted: promotion: lost race to version")
    assert "srv-race.promotion-lock" not in [m.name for m in _client(uri).search_registered_models()]  # released


def test_promotion_lock_admits_one_holder_at_a_time(server):
    """The lock itself (what makes the compare-and-set safe): holders never overlap."""
    from concurrent.futures import ThreadPoolExecutor

    from stunning.registry import promotion_lock

    uri, _ = server
    client = _client(uri)
    client.create_registered_model("srv-lock")
    inside, overlaps, held = [0], [], []

    def hold(_):
        with promotion_lock(client, "srv-lock", poll_s=0.05):
            inside[0] += 1
            overlaps.append(inside[0])
            t = time.monotonic()
            time.sleep(0.05)
            inside[0] -= 1
            held.append(time.monotonic() - t)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(hold, range(8)))
    assert overlaps == [1] * 8 and len(held) == 8


def test_an_experiment_with_a_machine_local_artifact_path_is_refused(server, tmp_path):
    from stunning.mlflow_store import TrackingStoreError
    from stunning.tracking import configure_mlflow

    uri, _ = server
    _client(uri).create_experiment("srv-local-path", artifact_location=(tmp_path / "elsewhere").as_uri())
    with pytest.raises(TrackingStoreError, match="a path on one machine") as exc:
        configure_mlflow(RegistryConfig(tracking_uri=uri, experiment="srv-local-path"), tmp_path)
    assert "registry.experiment" in str(exc.value)


# --------------------------------------------------------------------------- checkpoints between machines


def _training_run(uri: str, experiment: str, style: str, fingerprint: str) -> str:
    """An MLflow run on the server tagged like the train stage's run of `style`."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, tags={"style": style, "stage": "train", "fingerprint": fingerprint})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _checkpoint(folder: Path, style: str, fingerprint: str, step: int):
    import torch

    from stunning.training.checkpoint import CheckpointStore

    store = CheckpointStore.for_run(folder, style, fingerprint, keep=2)
    store.save(step, {"unet.lora_A.weight": torch.full((4, 8), 0.5)}, {"state": {}, "param_groups": []},
               {"loop": torch.tensor([1, 2, 3], dtype=torch.uint8)}, [0.5] * step)
    return store


def test_a_workers_checkpoint_reaches_another_clone_through_the_server(server, tmp_path):
    from stunning.shared_checkpoints import fetch, publish

    uri, _ = server
    cfg = RegistryConfig(tracking_uri=uri, experiment="ckpt-carry")
    worker, here = tmp_path / "worker", tmp_path / "here"
    _checkpoint(worker / "checkpoints", "noir", "fp0noir", 3)
    store = _checkpoint(worker / "checkpoints", "noir", "fp0noir", 6)  # the final step is the one carried
    run_id = _training_run(uri, "ckpt-carry", "noir", "fp0noir")
    other_run = _training_run(uri, "ckpt-carry", "impressionist", "fp0imp")
    _checkpoint(worker / "checkpoints", "impressionist", "fp0imp", 6)
    assert publish(cfg, worker, worker / "checkpoints", run_id, "batch-1")["step"] == 6
    publish(cfg, worker, worker / "checkpoints", other_run, "batch-0")  # another fan-out's: not fetched

    carried = fetch(cfg, here, here / "checkpoints", "batch-1")
    assert [(c.style, c.step, c.outcome, c.run_id) for c in carried] == [("noir", 6, "downloaded", run_id)]
    got = here / "checkpoints/noir/fp0noir/step-6"
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in (store.root / "step-6").iterdir())
    for f in got.iterdir():
        assert f.read_bytes() == (store.root / "step-6" / f.name).read_bytes()
    assert not (here / "checkpoints/impressionist").exists()
    assert [p.name for p in (here / "checkpoints/noir/fp0noir").iterdir()] == ["step-6"]  # no temporary left
    # A second fetch (or one in the clone that trained) finds it there.
    assert [c.outcome for c in fetch(cfg, here, here / "checkpoints", "batch-1")] == ["already here"]


def test_a_carried_checkpoint_that_does_not_load_is_refused_and_removed(server, tmp_path):
    from stunning.shared_checkpoints import CheckpointTransferError, fetch, publish

    uri, _ = server
    cfg = RegistryConfig(tracking_uri=uri, experiment="ckpt-bad")
    worker, here = tmp_path / "worker", tmp_path / "here"
    store = _checkpoint(worker / "checkpoints", "noir", "fp1", 4)
    state = store.root / "step-4" / "state.json"
    state.write_text(state.read_text().replace('"fp1"', '"someone-else"'))  # not this run's fingerprint
    run_id = _training_run(uri, "ckpt-bad", "noir", "fp1")
    _client(uri).log_artifacts(run_id, str(store.root / "step-4"), "checkpoint/step-4")
    _client(uri).set_tag(run_id, "checkpoint.step", "4")
    _client(uri).set_tag(run_id, "fanout.batch", "bad")
    with pytest.raises(CheckpointTransferError, match=rf"style 'noir' from MLflow run {run_id}.*does not load"):
        fetch(cfg, here, here / "checkpoints", "bad")
    assert not (here / "checkpoints/noir/fp1/step-4").exists()
    # Publishing a run with no checkpoint in the folder names what is missing.
    with pytest.raises(CheckpointTransferError, match="no valid checkpoint of style 'noir'"):
        publish(cfg, worker, tmp_path / "empty", run_id, "bad")


def test_with_a_local_store_nothing_is_published_or_fetched(tmp_path):
    from stunning.shared_checkpoints import fetch, publish

    cfg = RegistryConfig(tracking_uri=f"sqlite:///{tmp_path / 'never.db'}")
    assert publish(cfg, tmp_path, tmp_path / "checkpoints", "run-id", "b") is None
    assert fetch(cfg, tmp_path, tmp_path / "checkpoints", "b") == []
    assert not (tmp_path / "never.db").exists()  # no store was opened
