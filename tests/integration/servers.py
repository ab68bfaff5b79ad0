"""Real servers and workers for the integration tests, on 127.0.0.1 and free ports: a
`prefect server start`, `prefect worker start` subprocesses, and waiting on flow runs. Every
process is stopped when its block ends, also when the test fails."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from stunning.mlflow_server import free_port
from tests.factories import project_env

PREFECT = str(Path(sys.executable).parent / "prefect")
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
POOL = "stunning"


@contextmanager
def started(cmd: list[str], env: dict, cwd: Path, log: Path) -> Iterator[subprocess.Popen]:
    """A subprocess whose output goes to `log`; interrupted (then killed) on the way out."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """`prefect server start` on a free 127.0.0.1 port, its database under `home`; yields the
    environment for clients and workers (PREFECT_API_URL set)."""
    port = free_port()
    env = project_env()
    env.update(PREFECT_HOME=str(home / "prefect-home"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false", DO_NOT_TRACK="1")
    for key in ("PREFECT_PROFILES_PATH", "PREFECT_API_KEY"):
        env.pop(key, None)
    log = home / "prefect-server.log"
    with started([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, home, log) as proc:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"prefect server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield env


def worker_command(name: str) -> list[str]:
    """What `make worker` starts (one flow run at a time), named."""
    return [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--name", name, "--limit", "1"]


def online_workers(api: str) -> list[str]:
    workers = httpx.post(f"{api}/work_pools/{POOL}/workers/filter", json={"limit": 200, "offset": 0}, timeout=10)
    if workers.status_code == 404:  # the pool does not exist yet
        return []
    workers.raise_for_status()
    return sorted(w["name"] for w in workers.json() if w.get("status") == "ONLINE")


def wait_for_workers(api: str, names: set[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not names <= set(online_workers(api)):
        if time.monotonic() > deadline:
            raise AssertionError(f"workers {sorted(names)} not online after {timeout:.0f} s: {online_workers(api)}")
        time.sleep(0.5)


def wait_for_run(api: str, run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    run: dict = {}
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
        if (run.get("state") or {}).get("type") in TERMINAL:
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout:.0f} s: {run.get('state')}")


def run_in_env(root: Path, env: dict, *cmd: str, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
