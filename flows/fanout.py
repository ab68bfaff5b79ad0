"""Training fan-out: with several Prefect workers online, one flow run per group of styles.

The DVC `train` stage trains the styles of `data.styles` one after another. When the
training phase runs with `STUNNING_POOL` set (`make worker` sets it), the train stage (or a
stage upstream of it) is out of date, and two or more workers of that pool are free (online,
minus the one running this flow: a worker runs one flow run at a time), :func:`fan_out` first
starts one `train-styles` deployment run per group of styles (:func:`plan_training`:
round-robin over at most one group per free worker) and waits for them. Each reproduces what
the train stage reads (:func:`upstream_of_train`) and trains its styles with the train
stage's own command (read from `dvc.yaml`) into a scratch folder, writing checkpoints to its
clone's `checkpoints/`. Checkpoints are keyed by style and fingerprint (config, data, base,
code), and a run always saves its last step, so the `dvc repro train` that follows finds
every style finished and resumes each at its last step: one DVC stage, one `dvc.lock`, as in
a sequential run.

Workers on other machines have their own clones. With the team's MLflow server
(`registry.tracking_uri: http://...`), each run publishes its styles' final checkpoints as
artifacts of their training runs, tagged with the fan-out's batch id, and :func:`fan_out`
downloads them into this clone's `checkpoints/` before the train stage runs
(:mod:`stunning.shared_checkpoints`). With a local store, only workers that see the same
`checkpoints/` (one clone, or a shared filesystem) save time; the others' styles are
trained again by the train stage (same result, not faster). With one worker, or outside a
worker, or with one style, nothing fans out: the training phase is the DVC stage alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger

from flows.dvc_runner import DvcError, project_root, repro, status

log = logging.getLogger(__name__)

POOL_ENV = "STUNNING_POOL"  # the work pool a worker serves (`make worker` sets it)
DEPLOYMENT = "train-styles/train-styles"
# The train stage's outputs that a fanned-out run writes to its scratch folder instead.
SCRATCH_OUTPUTS = ("--out", "--metrics", "--plots", "--plot-image", "--samples")


def plan_training(styles: list[str], workers: int) -> list[list[str]]:
    """Groups of styles, one per flow run: all in one group (sequential) with fewer than two
    workers or styles, else round-robin over min(workers, styles) groups."""
    if workers < 2 or len(styles) < 2:
        return [list(styles)] if styles else []
    n = min(workers, len(styles))
    return [list(styles[i::n]) for i in range(n)]


def online_workers(pool: str) -> int:
    """How many workers of `pool` the Prefect server reports online."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    with get_client(sync_client=True) as client:
        # limit/offset explicit: the server refuses `null` for them (see flows/deploy.py).
        workers = client.read_workers_for_work_pool(
            pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])), limit=200, offset=0)
    return len(workers)


def _filled(text: str, params: dict) -> str:
    """`text` with DVC's `${a.b}` templating filled from params.yaml (parsed)."""

    def param(match: re.Match) -> str:
        value = params
        for key in match.group(1).strip().split("."):
            if not isinstance(value, dict) or key not in value:
                raise DvcError(f"dvc.yaml uses {match.group(0)}, which params.yaml does not set")
            value = value[key]
        return str(value)

    return re.sub(r"\$\{([^}]+)\}", param, text)


def _dag(root: Path) -> tuple[dict, dict]:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"], yaml.safe_load((root / "params.yaml").read_text())


def stage_args(root: Path) -> list[str]:
    """The `train` stage's command from `dvc.yaml`, `${...}` filled from params.yaml and split
    into arguments."""
    stages, params = _dag(root)
    cmd = stages["train"]["cmd"]
    args = shlex.split(_filled(cmd, params))
    if args[:3] != ["python", "-m", "stages.train"] or len(args) % 2 == 0:
        raise DvcError(f"dvc.yaml: the train stage's cmd is not `python -m stages.train --flag value ...`: {cmd}")
    return args


def upstream_of_train(root: Path) -> list[str]:
    """The stages whose outputs the `train` stage reads (curated data, base model, research
    report), from dvc.yaml: what a worker's clone reproduces (or finds up to date) first."""
    stages, params = _dag(root)

    def outs(spec: dict) -> list[str]:
        return [_filled(next(iter(o)) if isinstance(o, dict) else o, params) for o in spec.get("outs", [])]

    producers = {out: name for name, spec in stages.items() for out in outs(spec)}
    deps = [_filled(d, params) for d in stages["train"].get("deps", [])]
    return sorted({producers[d] for d in deps if d in producers})


def train_path(root: Path, flag: str) -> Path:
    """A path the train stage's cmd passes with `flag` (e.g. `--checkpoints`, `--metrics`), as
    dvc.yaml wires it."""
    args = stage_args(root)
    flags = dict(zip(args[3::2], args[4::2], strict=True))
    if flag not in flags:
        raise DvcError(f"dvc.yaml: the train stage's cmd has no {flag}")
    return root / flags[flag]


def checkpoint_dir(root: Path) -> Path:
    """The train stage's `--checkpoints` folder: where carried checkpoints go."""
    return train_path(root, "--checkpoints")


def on_a_worker() -> bool:
    """True inside a deployment's flow run (a worker started this process), False for a flow
    called directly (`python -m flows.pipeline`)."""
    from prefect.runtime import deployment

    return deployment.id is not None


def train_command(root: Path, params_file: Path, scratch: Path) -> list[str]:
    """The `train` stage's command from `dvc.yaml`, with `params_file` and its outputs moved
    under `scratch` (inputs and `--checkpoints` as wired in dvc.yaml)."""
    args = stage_args(root)
    out = [sys.executable, "-m", "stages.train"]
    for flag, value in zip(args[3::2], args[4::2], strict=True):
        if flag == "--params":
            value = str(params_file)
        elif flag in SCRATCH_OUTPUTS:
            value = str(scratch / Path(value).name)
        out += [flag, value]
    return out


def group_params(params: dict, styles: list[str]) -> dict:
    """`params` (params.yaml, parsed) for training `styles` only: `data.styles` narrowed, and
    the merge blends of other styles left out so the file still validates (merge settings
    are not inputs of training, nor of its checkpoint fingerprint)."""
    known = list(params["data"]["styles"])
    unknown = sorted(set(styles) - set(known))
    if unknown or not styles:
        raise ValueError(f"styles {sorted(styles)} must be some of params.yaml data.styles {known}")
    out = {**params, "data": {**params["data"], "styles": list(styles)}}
    merge = dict(params.get("merge") or {})
    if "blends" in merge:
        merge["blends"] = [b for b in merge["blends"] if set(b.get("weights", {})) <= set(styles)]
    names = {b["name"] for b in merge.get("blends", [])}
    if merge.get("fuse") is not None and merge["fuse"] not in names | set(styles):
        merge["fuse"] = styles[0]
    out["merge"] = merge
    return out


@flow(name="train-styles", log_prints=True)
def train_styles(styles: list[str], batch: str | None = None) -> dict:
    """Train `styles` only, in this worker's clone: the stages the train stage reads from first
    (curated data, base model, research report; DVC skips them when up to date), then the train stage's command on a params file whose
    `data.styles` is `styles`; checkpoints land in the clone's `checkpoints/`. Given the
    fan-out's `batch` id and a team MLflow server, each style's final checkpoint is published
    there for the machine that fanned out (:func:`stunning.shared_checkpoints.publish`)."""
    from stunning.config import load_params
    from stunning.shared_checkpoints import publish

    logger = get_run_logger()
    root = project_root()
    ready = repro(upstream_of_train(root), root)
    name = "-".join(styles)
    scratch = root / "build" / "fanout" / name
    scratch.mkdir(parents=True, exist_ok=True)
    params = group_params(yaml.safe_load((root / "params.yaml").read_text()), styles)
    params_file = scratch / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    cmd = train_command(root, params_file, scratch)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    for line in (proc.stdout + proc.stderr).splitlines()[-40:]:
        logger.info(line)
    if proc.returncode != 0:
        raise RuntimeError(f"training {styles} failed (exit {proc.returncode}); see the log above")
    published = []
    if batch:
        report = json.loads((scratch / "train.json").read_text())
        registry, checkpoints = load_params(params_file).registry, checkpoint_dir(root)
        for style in styles:
            done = publish(registry, root, checkpoints, report["styles"][style]["mlflow_run_id"], batch)
            if done:
                logger.info("published the checkpoint of %s (step %d) to %s", style, done["step"], registry.tracking_uri)
                published.append(done)
    return {"styles": list(styles), "ran_before": ready.ran, "metrics": str(scratch / "train.json"),
            "published": published}


@dataclass
class FanOut:
    """What :func:`fan_out` did: the groups that ran as flow runs ([] when training stays
    sequential), those whose run did not complete, and the checkpoints carried back from the
    team's MLflow server (:class:`stunning.shared_checkpoints.Carried`, as dicts)."""

    groups: list[list[str]] = field(default_factory=list)
    failed: list[tuple[list[str], str | None]] = field(default_factory=list)
    carried: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.groups)


def fan_out(root: Path | None = None) -> FanOut:
    """Run the fan-out if it applies (see the module docstring)."""
    pool = os.environ.get(POOL_ENV)
    if not pool:
        return FanOut()
    root = root or project_root()
    styles = list(yaml.safe_load((root / "params.yaml").read_text())["data"]["styles"])
    if len(styles) < 2:
        return FanOut()
    try:
        workers = online_workers(pool)
    except Exception as exc:  # no server reachable: train sequentially, as on one machine
        log.warning("could not count the workers of pool %r (%s); training sequentially", pool, exc)
        return FanOut()
    # A worker runs one flow run at a time (`make worker`: --limit 1, training takes the whole
    # machine): the one running this flow is busy until the fan-out is done.
    if on_a_worker():
        workers -= 1
    groups = plan_training(styles, workers)
    if len(groups) < 2:
        return FanOut()
    stale = {stage: why for stage, why in status(root, ["train"]).items() if why != ["always changed"]}
    if not stale:  # `dvc repro train` would not train: nothing to fan out
        log.info("the train stage is up to date: no fan-out")
        return FanOut()
    from prefect.deployments import run_deployment

    from stunning.config import load_params
    from stunning.shared_checkpoints import fetch

    batch = uuid.uuid4().hex
    log.info("%d workers online in pool %r: training %s as %d flow runs (batch %s)", workers, pool, groups,
             len(groups), batch)
    with ThreadPoolExecutor(len(groups)) as pool_exec:
        runs = list(pool_exec.map(
            lambda g: run_deployment(DEPLOYMENT, parameters={"styles": g, "batch": batch}, timeout=None), groups))
    failed = [(g, r.state.name if r.state else None) for g, r in zip(groups, runs, strict=True)
              if not (r.state and r.state.is_completed())]
    if failed:
        # The DVC stage that follows trains whatever is missing; say which part failed.
        log.warning("fanned-out training runs did not complete: %s; the train stage trains those styles", failed)
    carried = fetch(load_params(root / "params.yaml").registry, root, checkpoint_dir(root), batch)
    for c in carried:
        log.info("checkpoint of %s (step %d, fingerprint %s) from MLflow run %s: %s", c.style, c.step,
                 c.fingerprint, c.run_id, c.outcome)
    return FanOut(groups, failed, [c.as_dict() for c in carried])
