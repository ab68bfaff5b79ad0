"""The project's MLflow store (``mlruns/mlflow.db`` + ``mlruns/artifacts``): open, check, relocate.

:func:`stunning.tracking.configure_mlflow` calls :func:`open_store` before MLflow touches the
database, so every user of the store (training, register, validate, serve, rollback) gets:

* **check** (:func:`check_store`): a file that is not an SQLite database, is truncated or
  malformed, or is not an MLflow database raises :class:`TrackingStoreError` naming the
  file and the recovery (move it aside; re-running the register stage re-creates the
  registry; ``mlruns/artifacts`` is kept). A database another process holds a write lock
  on (``database is locked``) is retried with backoff (:data:`LOCK_BACKOFF_S`: 5 tries over
  about 10 s) before the same error class says who to wait for.
* **relocation** (:func:`relocate_store`): MLflow records absolute ``file://`` artifact
  locations (experiments, runs, logged models, model versions). When a project is copied,
  cloned or moved, those still point into the *original* project's ``mlruns/artifacts``,
  so the copy would read -- and write -- the original's files (and a vanished original
  gives empty folders, not errors). On open, every such location whose path is outside
  this project but ends in the same relative tail (``registry.artifact_root``, e.g.
  ``mlruns/artifacts``) is rewritten, in one transaction, to this project's folder.
  Relocation applies only to a project-relative store (relative ``tracking_uri`` and
  ``artifact_root``); an absolute, shared store is left as it is.
* **a tracking server** (``registry.tracking_uri: http(s)://HOST:PORT``, an ``mlflow server
  --serve-artifacts`` shared by a team): nothing local is checked or relocated; the server
  owns its database and artifact store (``mlflow-artifacts:/`` URIs, so no client writes
  another machine's file paths). :func:`check_server` probes its ``/health`` with a short
  timeout first, so an unreachable server is one clear :class:`ServerUnreachableError`
  naming the URI and what to run, not minutes of the MLflow client's HTTP retries.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

from stunning.config import RegistryConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds to wait before each retry of a locked database (5 tries, ~10 s in all).
LOCK_BACKOFF_S: tuple[float, ...] = (0.5, 1.5, 3.0, 5.0)
SQLITE_MAGIC = b"SQLite format 3\x00"

#: (table, column) pairs holding artifact locations (MLflow 3's SQLAlchemy models:
#: store/tracking/dbmodels/models.py and store/model_registry/dbmodels/models.py).
LOCATION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


class TrackingStoreError(RuntimeError):
    """The MLflow store cannot be used (corrupt, not MLflow's, locked); the message says which
    file and how to recover."""


class ServerUnreachableError(TrackingStoreError):
    """``registry.tracking_uri`` names an MLflow tracking server that does not answer."""


#: Seconds :func:`check_server` waits for the server's ``/health``.
SERVER_PROBE_TIMEOUT_S = 5.0


def is_server_uri(uri: str) -> bool:
    """True for an MLflow tracking server (``http://`` or ``https://``), False for a local store."""
    return urlparse(uri).scheme in ("http", "https")


def server_unreachable_error(uri: str, why: str) -> ServerUnreachableError:
    return ServerUnreachableError(
        f"MLflow tracking server {uri} (registry.tracking_uri in params.yaml) is unreachable: {why}. "
        f"Start it (`stunning registry server --port {urlparse(uri).port or 5000}`, or `mlflow server "
        f"--backend-store-uri ... --serve-artifacts --host HOST --port PORT`; README, Team setup), check "
        f"the host and port, or set registry.tracking_uri back to a local store (sqlite:///mlruns/mlflow.db)."
    )


def check_server(uri: str, timeout: float = SERVER_PROBE_TIMEOUT_S) -> None:
    """Raise :class:`ServerUnreachableError` unless the server at ``uri`` answers ``/health``.

    Uses MLflow's own HTTP client and credentials (``MLFLOW_TRACKING_USERNAME`` / ``_TOKEN``,
    TLS settings), once, without retries."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(
            get_default_host_creds(uri.rstrip("/")), "/health", "GET", max_retries=0, timeout=timeout,
            raise_on_status=False,
        )
    except Exception as exc:  # requests' ConnectionError/Timeout, wrapped by MLflow in an MlflowException
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "refused" in str(exc).lower():
            text = "connection refused (no server listening there)"
        elif "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            text = f"no answer within {timeout:g} s"
        raise server_unreachable_error(uri, text) from None
    if response.status_code != 200:
        raise server_unreachable_error(
            uri, f"GET /health answered HTTP {response.status_code} (is it an MLflow server? is the URI's path right?)"
        )


def sqlite_path(cfg: RegistryConfig, root: str | Path | None = None) -> Path | None:
    """The SQLite file of ``cfg.tracking_uri`` (relative to ``root``), or None for other stores."""
    uri = cfg.tracking_uri
    if not uri.startswith("sqlite:///"):
        return None
    if uri.startswith("sqlite:////"):
        return Path(uri.removeprefix("sqlite:///"))
    return Path(root or Path.cwd()).resolve() / uri.removeprefix("sqlite:///")


def _recovery(db: Path) -> str:
    return (
        f"To recover, move it aside (e.g. `mv {db} {db}.broken`) and re-run: the register stage "
        f"(`dvc repro register`) re-creates the registry and the next training run its runs; the "
        f"artifacts folder next to it is kept, nothing in it is deleted."
    )


def corrupt_error(db: Path, what: str) -> TrackingStoreError:
    return TrackingStoreError(f"MLflow store {db} is unusable: {what}. {_recovery(db)}")


def locked_error(db: Path, tries: int, waited: float) -> TrackingStoreError:
    return TrackingStoreError(
        f"MLflow store {db} is locked by another process (sqlite: database is locked); gave up after "
        f"{tries} tries over {waited:.1f} s. Wait for the other run (a training, register or "
        f"`mlflow ui`/`stunning serve` writing to it) to finish, or stop it, then try again."
    )


def _is_locked(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database is busy" in text or "database table is locked" in text


def _is_corrupt(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(
        s in text
        for s in ("file is not a database", "malformed", "file is encrypted", "disk image", "not a database")
    )


def with_lock_retries(
    db: Path,
    action: Callable[[], T],
    backoff: Sequence[float] = LOCK_BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``action``; on ``database is locked`` wait ``backoff[i]`` and retry, then raise
    :class:`TrackingStoreError`. A corrupt-database error becomes a :class:`TrackingStoreError`
    with the recovery at once. Anything else propagates unchanged."""
    waited = 0.0
    for attempt in range(len(backoff) + 1):
        try:
            return action()
        except TrackingStoreError:
            raise
        except Exception as exc:  # sqlite3.OperationalError, SQLAlchemy's, MlflowException wrapping them
            if _is_corrupt(exc):
                raise corrupt_error(db, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
            if not _is_locked(exc):
                raise
            if attempt == len(backoff):
                raise locked_error(db, attempt + 1, waited) from exc
            log.warning("MLflow store %s is locked; retrying in %.1f s (%d/%d)", db, backoff[attempt], attempt + 1, len(backoff))
            sleep(backoff[attempt])
            waited += backoff[attempt]
    raise AssertionError("unreachable")  # pragma: no cover


@contextmanager
def _connect(db: Path) -> Iterator[sqlite3.Connection]:
    # timeout=0: the caller's backoff decides how long to wait, not sqlite's busy handler
    conn = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def _check_once(db: Path) -> None:
    size = db.stat().st_size
    if size == 0:
        raise corrupt_error(db, "the file is empty (0 bytes), not an MLflow database")
    with db.open("rb") as fh:
        header = fh.read(len(SQLITE_MAGIC))
    if header != SQLITE_MAGIC:
        raise corrupt_error(db, "not an SQLite database (its first bytes are not the SQLite header)")
    if size < 512:
        raise corrupt_error(db, f"truncated: {size} bytes is shorter than one SQLite page")
    with _connect(db) as conn:
        try:
            result = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
            if result != ["ok"]:
                raise corrupt_error(db, "the database is damaged (sqlite quick_check: " + "; ".join(map(str, result)) + ")")
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "alembic_version" not in tables:
                raise corrupt_error(db, f"an SQLite database, but not MLflow's (tables: {sorted(tables)[:5]})")
            # a write lock held elsewhere shows here, not in the reads above
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        except sqlite3.DatabaseError as exc:
            if _is_locked(exc):
                raise
            raise corrupt_error(db, f"sqlite: {exc}") from exc


def check_store(db: Path, backoff: Sequence[float] = LOCK_BACKOFF_S) -> None:
    """Raise :class:`TrackingStoreError` if ``db`` exists and is not a usable MLflow database
    (retrying a locked one per ``backoff``). A missing file is fine: MLflow creates it."""
    db = Path(db)
    if not db.exists():
        return
    with_lock_retries(db, lambda: _check_once(db), backoff)


def _local_path(value: str) -> tuple[str, str] | None:
    """(kind, absolute path) of a location that is a local absolute path or file URI."""
    if value.startswith("file:"):
        parsed = urlparse(value)
        if parsed.netloc not in ("", "localhost"):
            return None
        return "uri", unquote(parsed.path)
    if value.startswith("/"):
        return "path", value
    return None


def _relocated(value: str, tail: tuple[str, ...], new_dir: Path, root: Path) -> str | None:
    """``value`` pointed at this project's artifacts folder, or None if it needs no change."""
    found = _local_path(value)
    if found is None:
        return None
    kind, path = found
    parts = Path(path).parts
    n = len(tail)
    for i in range(len(parts) - n, 0, -1):  # the last occurrence of the tail
        if parts[i : i + n] == tail:
            prefix = Path(*parts[: i + n])
            if prefix == new_dir or prefix.is_relative_to(root):
                return None
            moved = new_dir.joinpath(*parts[i + n :])
            return moved.as_uri() if kind == "uri" else str(moved)
    return None


def relocate_store(
    db: Path, root: Path, artifact_root: str, backoff: Sequence[float] = LOCK_BACKOFF_S
) -> dict[str, int]:
    """Point artifact locations that lead into another project's ``artifact_root`` at this one's.

    Returns ``{"table.column": rows rewritten}`` (empty when nothing pointed elsewhere). The
    rewrite is one transaction: a crash leaves the database as it was.
    """
    db, root = Path(db), Path(root).resolve()
    tail = Path(artifact_root).parts
    if not db.exists() or Path(artifact_root).is_absolute() or not tail:
        return {}
    new_dir = (root / artifact_root).resolve()

    def once() -> dict[str, int]:
        changed: dict[str, int] = {}
        with _connect(db) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            conn.execute("BEGIN IMMEDIATE")
            try:
                for table, column in LOCATION_COLUMNS:
                    if table not in tables:
                        continue
                    columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                    if column not in columns:
                        continue
                    rows = conn.execute(f"SELECT rowid, {column} FROM {table} WHERE {column} IS NOT NULL").fetchall()
                    for rowid, value in rows:
                        new = _relocated(str(value), tail, new_dir, root)
                        if new is not None and new != value:
                            conn.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", (new, rowid))
                            changed[f"{table}.{column}"] = changed.get(f"{table}.{column}", 0) + 1
                conn.execute("COMMIT" if changed else "ROLLBACK")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return changed

    changed = with_lock_retries(db, once, backoff)
    if changed:
        log.warning(
            "MLflow store %s pointed into another project's %s (a copied or moved project); now points at %s: %s",
            db, artifact_root, new_dir, ", ".join(f"{k}: {v}" for k, v in sorted(changed.items())),
        )
    return changed


def open_store(
    cfg: RegistryConfig, root: str | Path | None = None, backoff: Sequence[float] = LOCK_BACKOFF_S
) -> tuple[str, Path | None]:
    """Check and relocate the store of ``cfg``; return (tracking URI, artifacts folder).

    Relative paths in ``cfg`` are resolved against ``root`` (default: the working directory).
    Creates the folders, never the database (MLflow does that on first use). For a tracking
    server the artifacts folder is None (the server's ``--artifacts-destination`` decides)
    and only the server's reachability is checked (:func:`check_server`).
    """
    if is_server_uri(cfg.tracking_uri):
        check_server(cfg.tracking_uri)
        return cfg.tracking_uri.rstrip("/"), None
    root = Path(root or Path.cwd()).resolve()
    uri = cfg.tracking_uri
    db = sqlite_path(cfg, root)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db}"
    artifacts = (root / cfg.artifact_root).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    if db is not None:
        check_store(db, backoff)
        if not cfg.tracking_uri.startswith("sqlite:////") and db.is_relative_to(root):
            relocate_store(db, root, cfg.artifact_root, backoff)
    return uri, artifacts
