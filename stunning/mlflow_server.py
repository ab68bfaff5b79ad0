"""A shared MLflow tracking server for a team (or a test): `mlflow server --serve-artifacts`.

One machine runs the server; every machine's `params.yaml` says
`registry.tracking_uri: http://HOST:PORT` and nothing else changes. The server keeps runs
and the model registry in a SQL database (`--backend-store-uri`: PostgreSQL for a team,
SQLite for one machine or a test) and *serves* the artifacts (`--serve-artifacts
--artifacts-destination DIR`): clients upload and download through it (`mlflow-artifacts:/`
URIs), so no client ever writes or reads another machine's file paths.

:func:`server_command` is the command line, :func:`running_server` starts it in the
background and waits until it answers (tests, scripts), `stunning registry server` runs
it in the foreground.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from stunning.mlflow_store import ServerUnreachableError, check_server

log = logging.getLogger(__name__)

#: Seconds to wait for a started server to answer `/health` (its first start creates the
#: database tables: a few seconds on SQLite, more on a busy machine).
START_TIMEOUT_S = 120.0


class ServerStartError(RuntimeError):
    """The MLflow server did not start; the message holds the end of its log."""


def _backend_uri(uri: str) -> str:
    """A relative `sqlite:///` path made absolute (the server may run from another folder)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def _artifacts_uri(destination: str | Path) -> str:
    text = str(destination)
    return text if urlparse(text).scheme not in ("", "file") else str(Path(text.removeprefix("file://")).resolve())


def server_command(
    backend_store_uri: str,
    artifacts_destination: str | Path,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The `mlflow server` command line: SQL backend, served artifacts, `host:port`.

    `backend_store_uri`: `sqlite:///path/mlflow.db` or `postgresql+psycopg://user:pw@host/db`
    (needs `pip install "psycopg[binary]"` on the server machine). `artifacts_destination`:
    a folder (made absolute) or an object store URI (`s3://bucket/prefix`).
    """
    if "://" not in backend_store_uri or backend_store_uri.startswith("file:"):  # a folder, not a database
        raise ValueError(
            f"--backend-store-uri {backend_store_uri!r}: use a SQL database, e.g. sqlite:///mlruns-server/mlflow.db "
            "or postgresql+psycopg://USER:PASSWORD@HOST:5432/mlflow (MLflow 3 has no file store for a server)"
        )
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", _backend_uri(backend_store_uri),
        "--serve-artifacts", "--artifacts-destination", _artifacts_uri(artifacts_destination),
        "--host", host, "--port", str(port),
    ]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    return cmd + list(extra)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_uri(host: str, port: int) -> str:
    """The `registry.tracking_uri` of a server bound to `host` (0.0.0.0 / :: mean this machine)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def _tail(path: Path | None, lines: int = 25) -> str:
    if path is None or not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_until_ready(uri: str, proc: subprocess.Popen | None = None, timeout: float = START_TIMEOUT_S,
                     log_path: Path | None = None) -> None:
    """Poll `uri`'s `/health` until it answers; :class:`ServerStartError` if `proc` exits or
    `timeout` passes (with the end of the server's log)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServerStartError(f"mlflow server exited with code {proc.returncode} before answering at {uri}:\n"
                                   + _tail(log_path))
        try:
            check_server(uri, timeout=2.0)
            return
        except ServerUnreachableError:
            if time.monotonic() > deadline:
                raise ServerStartError(f"mlflow server at {uri} did not answer within {timeout:g} s:\n"
                                       + _tail(log_path)) from None
            time.sleep(0.25)


def _stop(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGINT the server's process group (uvicorn workers too), as Ctrl+C would, SIGKILL after
    `grace` s (uvicorn waits for idle keep-alive connections of clients still alive, and the
    `mlflow server` parent ignored SIGTERM in MLflow 3.17)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def running_server(
    backend_store_uri: str,
    artifacts_destination: str | Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int | None = 1,
    log_path: Path | None = None,
    timeout: float = START_TIMEOUT_S,
) -> Iterator[str]:
    """Run `mlflow server` in the background while the block runs; yields its tracking URI.

    `port=None` picks a free one. The server's output goes to `log_path` (default: next to
    the artifacts destination when it is a folder, else discarded); it is stopped (its whole
    process group) when the block ends, also on error.
    """
    port = port or free_port(host)
    cmd = server_command(backend_store_uri, artifacts_destination, host, port, workers)
    if log_path is None and urlparse(str(artifacts_destination)).scheme in ("", "file"):
        log_path = Path(_artifacts_uri(artifacts_destination)).parent / f"mlflow-server-{port}.log"
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115 - closed below
    uri = server_uri(host, port)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(uri, proc, timeout, log_path)
        log.info("mlflow server at %s (pid %s, log %s)", uri, proc.pid, log_path)
        yield uri
    finally:
        _stop(proc)
        if out is not subprocess.DEVNULL:
            out.close()
