"""Training fan-out: with several Prefect workers online, one flow run per group of styles.

The DVC `train` stage trains the styles of `data.styles` one after another. When the
training phase runs on a worker (`make worker` sets `STUNNING_POOL`) and more than one
worker of that pool is online, :func:`fan_out` first starts one `train-styles` deployment
run per group of styles (:func:`plan_training`: round-robin over at most as many groups as
there are workers) and waits for them; each trains its styles with the train stage's own
command (read from `dvc.yaml`) into a scratch folder, writing checkpoints to `checkpoints/`.
Checkpoints are keyed by style and fingerprint (config, data, base, code), and a run always
saves its last step, so the `dvc repro train` that follows finds every style finished and
resumes each at its last step: one DVC stage, one `dvc.lock`, as in a sequential run.

That speed-up needs the workers to see the same `checkpoints/` (workers on one machine in
one clone, or `checkpoints` on a shared filesystem). Workers on machines that share nothing
do their part, and the `dvc repro train` that follows trains the remaining styles itself:
the result is the same, only not faster. With one worker, or outside a worker, or with one
style, nothing fans out: the training phase is the DVC stage alone (sequential).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from prefect import flow, get_run_logger

from flows.dvc_runner import DvcError, project_root, repro

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


def train_command(root: Path, params_file: Path, scratch: Path) -> list[str]:
    """The `train` stage's command from `dvc.yaml`, with `params_file` and its outputs moved
    under `scratch` (inputs and `--checkpoints` as wired in dvc.yaml)."""
    stage = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["train"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    cmd = stage["cmd"]

    def param(match: re.Match) -> str:  # DVC's `${a.b}` templating, from params.yaml
        value = params
        for key in match.group(1).strip().split("."):
            if not isinstance(value, dict) or key not in value:
                raise DvcError(f"dvc.yaml: the train stage's cmd uses {match.group(0)}, which params.yaml does not set")
            value = value[key]
        return str(value)

    args = shlex.split(re.sub(r"\$\{([^}]+)\}", param, cmd))
    if args[:3] != ["python", "-m", "stages.train"]:
        raise DvcError(f"dvc.yaml: the train stage's cmd is not `python -m stages.train ...`: {cmd}")
    out = [sys.executable, "-m", "stages.train"]
    it = iter(args[3:])
    for flag in it:
        value = next(it)
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
def train_styles(styles: list[str]) -> dict:
    """Train `styles` only, in this worker's clone: the curated data and the base model first
    (DVC skips them when up to date), then the train stage's command on a params file whose
    `data.styles` is `styles`; checkpoints land in the clone's `checkpoints/`."""
    logger = get_run_logger()
    root = project_root()
    ready = repro(["curate", "base_model"], root)
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
    return {"styles": list(styles), "ran_before": ready.ran, "metrics": str(scratch / "train.json")}


def fan_out(root: Path | None = None) -> list[list[str]]:
    """Run the fan-out if it applies (see the module docstring); returns the groups that ran
    as separate flow runs ([] when training stays sequential)."""
    pool = os.environ.get(POOL_ENV)
    if not pool:
        return []
    root = root or project_root()
    styles = list(yaml.safe_load((root / "params.yaml").read_text())["data"]["styles"])
    if len(styles) < 2:
        return []
    try:
        workers = online_workers(pool)
    except Exception as exc:  # no server reachable: train sequentially, as on one machine
        log.warning("could not count the workers of pool %r (%s); training sequentially", pool, exc)
        return []
    groups = plan_training(styles, workers)
    if len(groups) < 2:
        return []
    from prefect.deployments import run_deployment

    log.info("%d workers online in pool %r: training %s as %d flow runs", workers, pool, groups, len(groups))
    with ThreadPoolExecutor(len(groups)) as pool_exec:
        runs = list(pool_exec.map(lambda g: run_deployment(DEPLOYMENT, parameters={"styles": g}, timeout=None), groups))
    failed = [(g, r.state.name if r.state else None) for g, r in zip(groups, runs, strict=True)
              if not (r.state and r.state.is_completed())]
    if failed:
        # The DVC stage that follows trains whatever is missing; say which part failed.
        log.warning("fanned-out training runs did not complete: %s; the train stage trains those styles", failed)
    return groups
