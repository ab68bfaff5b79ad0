"""Register the deployments of `prefect.yaml` on a Prefect server: `python -m flows.deploy`.

What `prefect deploy --all` does for this project's `prefect.yaml` (the flow, entrypoint,
work pool, schedules and pull steps of each deployment), through the same Prefect API
(`RunnerDeployment.apply`). Why not `prefect deploy` itself: with the FastAPI that
Prefect 3.8.8's server needs (0.152-0.154, constraints.txt), the check `prefect deploy`
makes after creating each deployment (which workers are online, a request with
`"limit": null`) is answered 422, so `prefect deploy --all` exits 1 after the first
deployment and never creates the others. This command skips that check and prints the
worker command instead.

The pull steps are kept as written, placeholders included: `{{ $STUNNING_ROOT }}` is filled
in on the worker at run time, so each worker runs the flows in its own clone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flows.dvc_runner import project_root

log = logging.getLogger(__name__)


class DeployConfigError(ValueError):
    """`prefect.yaml` is missing, unreadable or lacks a key; the message names file and key."""


@dataclass
class DeploymentSpec:
    name: str
    entrypoint: str
    work_pool: str
    description: str | None
    schedules: list[dict[str, Any]]


class _PullSteps:
    """The storage `RunnerDeployment` takes (Prefect's `RunnerStorage` protocol), reduced to
    what a worker-pool deployment uses: the pull steps, verbatim. Nothing is pulled here."""

    def __init__(self, steps: list[dict[str, Any]]):
        self.steps = steps
        self._base_path = Path.cwd()

    def set_base_path(self, path: Path) -> None:
        self._base_path = path

    @property
    def pull_interval(self) -> int | None:
        return None

    @property
    def destination(self) -> Path:
        return self._base_path

    async def pull_code(self) -> None:
        return None

    def to_pull_step(self) -> list[dict[str, Any]]:
        return self.steps

    def __eq__(self, other: Any) -> bool:
        return self.steps == getattr(other, "steps", None)


def read_config(path: Path) -> tuple[list[DeploymentSpec], list[dict[str, Any]]]:
    """The deployments and the pull steps of a `prefect.yaml`, checked."""
    if not path.is_file():
        raise DeployConfigError(f"{path}: not found; run from the project root or pass --file")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise DeployConfigError(f"{path}: not valid YAML: {exc}") from exc
    pull = doc.get("pull") or []
    if not isinstance(pull, list):
        raise DeployConfigError(f"{path}: `pull` must be a list of steps, got {type(pull).__name__}")
    specs = []
    for i, d in enumerate(doc.get("deployments") or []):
        where = f"{path}: deployments[{i}]"
        for key in ("name", "entrypoint"):
            if not d.get(key):
                raise DeployConfigError(f"{where} has no `{key}`")
        pool = (d.get("work_pool") or {}).get("name")
        if not pool:
            raise DeployConfigError(f"{where} ({d['name']}) has no `work_pool.name`")
        schedules = d.get("schedules") or []
        for s in schedules:
            if "cron" not in s:
                raise DeployConfigError(f"{where} ({d['name']}): only cron schedules are supported, got {s}")
        specs.append(DeploymentSpec(d["name"], d["entrypoint"], pool, d.get("description"), schedules))
    if not specs:
        raise DeployConfigError(f"{path}: no `deployments`")
    return specs, pull


def ensure_pool(name: str) -> bool:
    """Create the work pool `name` as a process pool if the server has none of that name
    (what `prefect work-pool create NAME --type process` does); True if it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
            return True
        except ObjectAlreadyExists:  # a worker started meanwhile creates its pool too
            return False


def deploy(root: Path, config: Path | None = None, pool: str | None = None,
           names: list[str] | None = None) -> dict[str, str]:
    """Create or update the deployments (all, or those in `names`); returns {"flow/deployment": id}."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.deployments.runner import RunnerDeployment
    from prefect.flows import load_flow_from_entrypoint

    specs, pull = read_config(config or root / "prefect.yaml")
    if names:
        unknown = sorted(set(names) - {s.name for s in specs})
        if unknown:
            raise DeployConfigError(f"no deployment named {', '.join(unknown)}; known: {', '.join(s.name for s in specs)}")
        specs = [s for s in specs if s.name in names]
    created = {}
    for name in sorted({pool} if pool else {s.work_pool for s in specs}):
        if ensure_pool(name):
            log.info("created work pool %r (type process)", name)
    for spec in specs:
        path, _, func = spec.entrypoint.partition(":")
        flow = load_flow_from_entrypoint(f"{root / path}:{func}")
        deployment = RunnerDeployment.from_flow(
            flow,
            name=spec.name,
            description=spec.description,
            schedules=[CronSchedule(cron=s["cron"], timezone=s.get("timezone")) for s in spec.schedules],
            work_pool_name=pool or spec.work_pool,
        )
        deployment.entrypoint = spec.entrypoint  # relative: resolved in the worker's clone
        deployment.storage = _PullSteps(pull)
        created[f"{flow.name}/{spec.name}"] = str(deployment.apply())
    return created


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=None, help="prefect.yaml (default: the project's)")
    ap.add_argument("--pool", default=None, help="work pool for every deployment (default: prefect.yaml's)")
    ap.add_argument("--name", action="append", help="deploy only this one (repeatable)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = project_root()
    try:
        created = deploy(root, args.file, args.pool, args.name)
    except DeployConfigError as exc:
        sys.exit(f"deploy: {exc}")
    for name, dep_id in created.items():
        print(f"deployment {name}: {dep_id}")
    pools = sorted({args.pool} if args.pool else {s.work_pool for s in read_config(args.file or root / "prefect.yaml")[0]})
    print("start a worker on each machine that runs flows (from its clone of this project):")
    for p in pools:
        print(f"    make worker POOL={p}    # STUNNING_ROOT=$PWD STUNNING_POOL={p} .venv/bin/prefect worker start --pool {p}")


if __name__ == "__main__":
    main()
