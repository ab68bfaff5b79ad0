"""The MLflow store: corrupt and locked databases give clear errors; a copied project uses its own store.

One project store (a tracked run with an artifact + a registered, promoted model version) is
built once for the module with the project's own tracking and registry functions (a fresh
SQLite MLflow database costs seconds); tests copy its database file or the whole project.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from stunning.config import RegistryConfig
from stunning.mlflow_store import (
    TrackingStoreError,
    _relocated,
    check_store,
    relocate_store,
    with_lock_retries,
)
from tests.factories import gate_report, make_registry_candidate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CFG = RegistryConfig()
DB = "mlruns/mlflow.db"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """A project root with a tracked run (artifact note.txt) and model version 1 @champion."""
    from stunning.registry import register_candidate
    from stunning.tracking import MlflowTracker, configure_mlflow

    root = tmp_path_factory.mktemp("original") / "proj"
    root.mkdir()
    configure_mlflow(CFG, root)
    tracker = MlflowTracker()
    run_id = tracker.start_run("tracked")
    note = root / "note.txt"
    note.write_text("made in the original")
    tracker.log_artifact(note)
    tracker.end_run()
    side = tmp_path_factory.mktemp("candidate")
    candidate = make_registry_candidate(side / "cand")
    base = side / "base"
    base.mkdir()
    (base / "model_index.json").write_text("{}")
    result = register_candidate(CFG, gate_report(True), candidate, base, "sd-unet", {"train": {"rank": 4}}, root=root)
    assert result["version"] == 1 and result["promoted"]
    return {"root": root, "run_id": run_id}


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _db_copy(project: dict, dest: Path) -> Path:
    (dest / "mlruns").mkdir(parents=True)
    shutil.copyfile(project["root"] / DB, dest / DB)
    return dest / DB


# --- corrupt ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, what",
    [
        (lambda db: db.write_bytes(b"this is not a database, just text\n" * 40), "not an SQLite database"),
        (lambda db: db.write_bytes(b""), "empty"),
        (lambda db: db.write_bytes(db.read_bytes()[: db.stat().st_size // 2]), "damaged|malformed|truncated"),
        (lambda db: db.write_bytes(db.read_bytes()[:300]), "truncated"),
    ],
    ids=["not-sqlite", "zero-bytes", "half", "under-a-page"],
)
def test_corrupt_database_is_a_clear_error_naming_the_file_and_the_recovery(project, tmp_path, damage, what):
    from stunning.registry import RegistryError, RegistryStoreError, aliases, champion_metrics, resolve, rollback
    from stunning.tracking import configure_mlflow

    db = _db_copy(project, tmp_path)
    damage(db)
    with pytest.raises(TrackingStoreError, match=what) as err:
        configure_mlflow(CFG, tmp_path)
    message = str(err.value)
    assert str(db) in message and "move it aside" in message and "register" in message
    assert "artifacts folder next to it is kept" in message
    # the registry's entry points (register/serve/rollback) raise it as a RegistryError
    for call in (
        lambda: aliases(CFG, tmp_path),
        lambda: champion_metrics(CFG, tmp_path),
        lambda: resolve(CFG, root=tmp_path),
        lambda: rollback(CFG, root=tmp_path),
    ):
        with pytest.raises(RegistryStoreError) as reg_err:
            call()
        assert isinstance(reg_err.value, RegistryError) and str(db) in str(reg_err.value)


def test_rollback_command_prints_the_recovery_without_a_traceback(project, tmp_path):
    from typer.testing import CliRunner

    from stunning.cli import app

    shutil.copyfile(Path(__file__).resolve().parents[2] / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "mlruns").mkdir()
    (tmp_path / DB).write_bytes(b"garbage" * 100)
    result = CliRunner().invoke(app, ["rollback", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2, result.output
    assert "move it aside" in result.output and "Traceback" not in result.output


def test_serve_answers_503_with_the_recovery(project, tmp_path):
    from fastapi.testclient import TestClient

    from stunning.serve import ServeSettings, create_app

    (tmp_path / "mlruns").mkdir()
    (tmp_path / DB).write_bytes(b"garbage" * 100)
    with TestClient(create_app(None, CFG, root=tmp_path, settings=ServeSettings(auth=False))) as client:
        response = client.post("/generate", json={"prompt": "a cat"})
    assert response.status_code == 503
    assert "move it aside" in response.text and "mlflow.db" in response.text


# --- locked ----------------------------------------------------------------------------


def test_locked_database_is_retried_then_a_clear_error(project, tmp_path):
    db = _db_copy(project, tmp_path)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's write lock
    try:
        with pytest.raises(TrackingStoreError, match="locked by another process") as err:
            check_store(db, backoff=(0.01, 0.01, 0.01, 0.01))
        assert str(db) in str(err.value) and "5 tries" in str(err.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    check_store(db, backoff=())  # free again: no error


def test_a_lock_released_during_the_backoff_is_waited_for(project, tmp_path):
    db = _db_copy(project, tmp_path)
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, lambda: holder.execute("ROLLBACK"))
    release.start()
    try:
        check_store(db, backoff=(0.2, 0.4, 0.8))
        relocate_store(db, tmp_path, CFG.artifact_root, backoff=(0.2,))
    finally:
        release.join()
        holder.close()


def test_default_backoff_is_bounded_five_tries_over_about_ten_seconds(tmp_path):
    slept: list[float] = []
    calls = []

    def locked():
        calls.append(1)
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(TrackingStoreError, match="gave up after 5 tries over 10.0 s"):
        with_lock_retries(tmp_path / "mlflow.db", locked, sleep=slept.append)
    assert len(calls) == 5 and 8 <= sum(slept) <= 12 and slept == sorted(slept)


def test_other_errors_are_not_retried(tmp_path):
    with pytest.raises(KeyError):
        with_lock_retries(tmp_path / "x.db", lambda: {}["k"], sleep=lambda s: pytest.fail("slept"))


# --- relocation ------------------------------------------------------------------------


def test_relocated_rewrites_only_another_projects_artifact_tail(tmp_path):
    new_root = Path("/new/proj")
    new_dir = new_root / "mlruns/artifacts"
    tail = ("mlruns", "artifacts")
    assert _relocated("file:///old/proj/mlruns/artifacts/1/abc/artifacts", tail, new_dir, new_root) == (
        "file:///new/proj/mlruns/artifacts/1/abc/artifacts"
    )
    assert _relocated("/old/p/mlruns/artifacts/models/m-1", tail, new_dir, new_root) == "/new/proj/mlruns/artifacts/models/m-1"
    assert _relocated("file:///old/a%20b/mlruns/artifacts/x", tail, new_dir, new_root) == "file:///new/proj/mlruns/artifacts/x"
    for unchanged in (
        "file:///new/proj/mlruns/artifacts/1",  # already ours
        "models:/m-123",  # not a location
        "s3://bucket/mlruns/artifacts/1",  # remote
        "/elsewhere/mlruns/0",  # another tail
        "file:///new/proj/sub/mlruns/artifacts/1",  # inside this project
    ):
        assert _relocated(unchanged, tail, new_dir, new_root) is None


def test_copied_project_uses_only_its_own_store(project, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from stunning.registry import model_artifacts, resolve
    from stunning.tracking import MlflowTracker, configure_mlflow

    original = project["root"]
    before = _tree_hashes(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)

    configure_mlflow(CFG, copy)  # relocates
    conn = sqlite3.connect(copy / DB)
    try:
        locations = [
            *(r[0] for r in conn.execute("SELECT artifact_location FROM experiments WHERE name = ?", (CFG.experiment,))),
            *(r[0] for r in conn.execute("SELECT artifact_uri FROM runs")),
            *(r[0] for r in conn.execute("SELECT artifact_location FROM logged_models")),
            *(r[0] for r in conn.execute("SELECT storage_location FROM model_versions")),
        ]
    finally:
        conn.close()
    assert locations and all(loc.startswith((copy / "mlruns/artifacts").as_uri()) for loc in locations), locations
    assert relocate_store(copy / DB, copy, CFG.artifact_root) == {}  # idempotent

    # read: the tracked run's artifact and the champion's files come from the copy
    run = MlflowClient().get_run(project["run_id"])
    note = Path(run.info.artifact_uri.removeprefix("file://")) / "note.txt"
    assert note.is_relative_to(copy) and note.read_text() == "made in the original"
    version, model_dir = resolve(CFG, root=copy)
    assert version == 1 and model_dir.resolve().is_relative_to(copy.resolve())
    assert model_artifacts(model_dir)["gate"].is_file()

    # write: a new run in the copy lands in the copy
    configure_mlflow(CFG, copy)
    tracker = MlflowTracker()
    new_id = tracker.start_run("in-the-copy")
    extra = tmp_path / "written.txt"
    extra.write_text("new")
    tracker.log_artifact(extra)
    tracker.end_run()
    written = Path(mlflow.get_run(new_id).info.artifact_uri.removeprefix("file://")) / "written.txt"
    assert written.is_relative_to(copy) and written.read_text() == "new"

    # the original: files and database byte-identical, still pointing at itself
    assert _tree_hashes(original) == before
    version, model_dir = resolve(CFG, root=original)
    assert model_dir.resolve().is_relative_to(original.resolve())


# --- the UI view ------------------------------------------------------------------------


def test_experiment_opens_in_the_model_training_view(project, tmp_path):
    """`mlflow ui` shows the runs table (not the GenAI overview) for the project's experiment,
    also in a store made before the tag existed (the tag is added on the next open)."""
    import mlflow

    from stunning.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, configure_mlflow

    db = _db_copy(project, tmp_path)
    with sqlite3.connect(db) as con:  # an older store: the experiment without the tag
        con.execute("DELETE FROM experiment_tags WHERE key = ?", (EXPERIMENT_KIND_TAG,))
    exp_id = configure_mlflow(CFG, tmp_path)
    assert mlflow.MlflowClient().get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_unreachable_tracking_server_fails_fast_naming_the_uri_and_the_fix(tmp_path):
    import time

    from stunning.mlflow_server import free_port
    from stunning.mlflow_store import ServerUnreachableError, is_server_uri
    from stunning.registry import RegistryStoreError, aliases
    from stunning.tracking import configure_mlflow

    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    cfg = RegistryConfig(tracking_uri=uri)
    assert is_server_uri(uri) and not is_server_uri(CFG.tracking_uri)
    started = time.monotonic()
    with pytest.raises(ServerUnreachableError) as exc:
        configure_mlflow(cfg, tmp_path)
    assert time.monotonic() - started < 10  # one probe, not minutes of MLflow's HTTP retries
    assert uri in str(exc.value) and "stunning registry server" in str(exc.value) and "refused" in str(exc.value)
    with pytest.raises(RegistryStoreError, match="unreachable"):
        aliases(cfg, tmp_path)
    assert not (tmp_path / "mlruns").exists()  # no local store made for a server URI


def test_server_command_serves_artifacts_from_a_sql_backend(tmp_path, monkeypatch):
    from stunning.mlflow_server import server_command, server_uri

    monkeypatch.chdir(tmp_path)
    cmd = server_command("sqlite:///team/mlflow.db", "team/artifacts", "0.0.0.0", 5001)
    assert cmd[1:4] == ["-m", "mlflow", "server"] and "--serve-artifacts" in cmd
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'team/mlflow.db'}"  # absolute
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / "team/artifacts")
    assert cmd[cmd.index("--port") + 1] == "5001" and server_uri("0.0.0.0", 5001) == "http://127.0.0.1:5001"
    pg = server_command("postgresql+psycopg://u:p@db/mlflow", "s3://bucket/mlflow")
    assert pg[pg.index("--backend-store-uri") + 1] == "postgresql+psycopg://u:p@db/mlflow"
    assert pg[pg.index("--artifacts-destination") + 1] == "s3://bucket/mlflow"
    for bad in ("./mlruns", "/srv/mlruns", "file:///srv/mlruns"):
        with pytest.raises(ValueError, match="SQL database"):
            server_command(bad, "a")


def test_registry_server_command_refuses_a_file_store():
    from typer.testing import CliRunner

    from stunning.cli import app

    result = CliRunner().invoke(app, ["registry", "server", "--backend-store-uri", "./mlruns"])
    assert result.exit_code == 2 and "use a SQL database" in result.output


def test_a_loss_curve_is_logged_in_batches_with_every_step(project):
    """`log_metric_steps`: one request per 1000 values (MLflow's limit), every step kept."""
    import mlflow
    from mlflow import MlflowClient

    from stunning.tracking import MlflowTracker, configure_mlflow

    configure_mlflow(CFG, project["root"])
    tracker = MlflowTracker()
    run_id = tracker.start_run("curve")
    tracker.log_metric_steps([(step, {"loss": 1.0 / step, "lr": 0.002}) for step in range(1, 1202)])  # 2402 values
    tracker.log_metric_steps([])
    tracker.end_run()
    history = MlflowClient().get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 1202))
    assert {m.step: m.value for m in history}[4] == pytest.approx(0.25)
    assert len(MlflowClient().get_metric_history(run_id, "lr")) == 1201 and mlflow.active_run() is None
