"""kill -9 of `dvc repro` during every stage of the DAG, then a rerun: the same outputs.

A copy of the tiny reproduced project (`tiny_dag_project`) is the reference. For each stage
in DAG order, `dvc repro --force --single-item <stage>` is started in its own process group,
and once the stage's own process has run for a seeded random time of 0.2-2.5 s (or as soon as
it has ended, while DVC commits its outputs to the cache and writes dvc.lock, for stages
shorter than that) the whole group — DVC and the stage — is killed with SIGKILL, as a power
cut or an OOM kill would. `dvc repro --single-item <stage>` then
runs again — after `python -m flows.dvc_runner repair`, which `make run` and the flows run
first: DVC itself writes `.dvc/tmp/rwlock` in place, and a kill mid-write left it empty, after
which every DVC command failed (found by this test) — and must succeed without other help:
no stale lock to remove by hand, no half-written output taken as done. The stage's outputs must then be what they were before the kill:

- artifacts (data, models, adapters, validation images, the release's weights): byte-identical;
- JSON reports: identical once the keys that are measurements of this run (seconds, latency,
  memory, free memory) are left out — they are timings of the machine, not results;
- Markdown reports and the labelled grids: identical apart from their numbers / image size
  (they print the same timings);
- the registry: the rerun of `register` leaves exactly one new, completely registered
  version as `@champion` (a version the killed run had created is finished, not duplicated).
  A forced `register` is a new version, so the stages after it (docs, handoff) are first
  brought up to date with it, and their outputs compared from there.

Finally `dvc status` reports nothing out of date.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.dvc_runner import repair_state
from tests.factories import project_env, run_in

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Keys of JSON reports that hold measurements of the run (wall time, memory, the machine's free
# memory) or the registry's identifiers of a new version; everything else must be identical.
MEASURED = re.compile(r"seconds|latency|memory|available_mb|per_s\b|steps_per|_time|duration")
REGISTRY_IDS = {"version", "champion_version", "previous_champion_version", "model_uri", "run_id", "created", "verdict"}
# Images that print measured numbers (the validation grid's per-variant latency labels).
LABELLED_IMAGES = {"grid.png", "quantize_grid.png"}  # labelled with measured seconds


def _normal(obj, drop_ids: bool = False):
    """`obj` without measured keys (and, for registry results, version identifiers)."""
    if isinstance(obj, dict):
        if isinstance(obj.get("name"), str) and MEASURED.search(obj["name"]):
            return None  # a gate check of a measured metric
        return {
            k: _normal(v, drop_ids) for k, v in obj.items()
            if not MEASURED.search(str(k)) and not (drop_ids and k in REGISTRY_IDS)
        }
    if isinstance(obj, list):
        return [x for x in (_normal(v, drop_ids) for v in obj) if x is not None]
    return obj


def _digest(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    if path.suffix == ".json":
        drop_ids = rel in ("reports/registry.json", "dist/release/manifest.json")
        return json.dumps(_normal(json.loads(path.read_text()), drop_ids), sort_keys=True)
    if path.suffix == ".md":
        return re.sub(r"\d+(\.\d+)?", "#", path.read_text())
    if path.name in LABELLED_IMAGES or rel.startswith("dist/release/SHA256SUMS"):
        from PIL import Image

        if path.suffix == ".png":
            with Image.open(path) as im:
                im.verify()
            return "valid png"
        return "\n".join(sorted(line.split()[-1] for line in path.read_text().splitlines()))  # the file list
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path, outs: list[str]) -> dict[str, str]:
    files: dict[str, str] = {}
    for out in outs:
        path = root / out
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                files[f.relative_to(root).as_posix()] = _digest(f, root)
    return files


def _stage_outs(spec: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in spec.get("outs", [])]


def _stage_process(dvc: subprocess.Popen, stage: str):
    import psutil

    try:
        children = psutil.Process(dvc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if f"stages.{stage}" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def kill_during(root: Path, stage: str, delay: float) -> str:
    """Start the stage under DVC, SIGKILL DVC and the stage `delay` s into the stage's own
    process (or as soon as it has ended); returns where the kill landed."""
    dvc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--force", "--single-item", stage], cwd=root, env=project_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    started = None
    where = "before the stage started"
    deadline = time.monotonic() + 300
    while dvc.poll() is None and time.monotonic() < deadline:
        proc = _stage_process(dvc, stage)
        now = time.monotonic()
        if proc is not None and started is None:
            started = now
        if started is not None and (now - started >= delay or proc is None):
            where = f"{now - started:.2f} s into the stage" if proc is not None else "as the stage ended"
            break
        time.sleep(0.02)
    if dvc.poll() is not None:
        pytest.fail(f"dvc repro of {stage} ended (rc {dvc.returncode}) before it could be killed")
    os.killpg(dvc.pid, signal.SIGKILL)
    dvc.wait()
    return where


def _registry_versions(root: Path) -> dict[int, dict]:
    from mlflow import MlflowClient

    from stunning.config import load_params
    from stunning.tracking import configure_mlflow

    cfg = load_params(root / "params.yaml").registry
    configure_mlflow(cfg, root)
    client = MlflowClient()
    return {int(v.version): dict(v.tags) for v in client.search_model_versions(f"name = '{cfg.model_name}'")}


def test_kill_9_during_every_stage_then_rerun_gives_the_same_outputs(tiny_dag_project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(tiny_dag_project, root, symlinks=True)
    run_in(root, sys.executable, "-m", "dvc", "repro")  # up to date whatever earlier tests changed (else a no-op)
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    rng = random.Random(20261202)
    log = []
    upstream_rerun = False
    for stage, spec in stages.items():
        outs = _stage_outs(spec)
        if upstream_rerun:  # a forced `register` made a new version: bring this stage up to date first
            run_in(root, sys.executable, "-m", "dvc", "repro", "--single-item", stage)
        before = snapshot(root, outs)
        versions = _registry_versions(root) if stage == "register" else None
        where = kill_during(root, stage, delay=rng.uniform(0.2, 2.5))
        # The rerun is what `make run` and the flows do: repair DVC's state, then `dvc repro`.
        repair_state(root)
        rerun = run_in(root, sys.executable, "-m", "dvc", "repro", "--single-item", stage, check=False)
        log.append(f"{stage}: killed {where}; rerun rc {rerun.returncode}")
        assert rerun.returncode == 0, "\n".join(log) + f"\n{rerun.stdout[-2000:]}\n{rerun.stderr[-2000:]}"
        after = snapshot(root, outs)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"{stage}: outputs differ after kill -9 + rerun: {changed}\n" + "\n".join(log)
        if versions is not None:
            upstream_rerun = True
            now = _registry_versions(root)
            new = sorted(set(now) - set(versions))
            assert len(new) == 1, f"register after kill -9: new versions {new} (one expected)\n" + "\n".join(log)
            assert {v: t.get("registration") for v, t in now.items() if v in new} == {new[0]: "complete"}
            record = json.loads((root / "reports/registry.json").read_text())
            assert record["version"] == new[0] and record["promoted"] == before_promoted(versions)
    status = run_in(root, sys.executable, "-m", "dvc", "status", "--json")
    stale = {k: v for k, v in json.loads(status.stdout or "{}").items() if v != ["always changed"]}
    assert stale == {}, "\n".join(log)
    print("\n".join(log))


def before_promoted(versions: dict[int, dict]) -> bool:
    """Whether the tiny project's last registered candidate was promoted (the rerun of the
    same candidate with the same gate report must decide the same)."""
    return versions[max(versions)].get("promoted") == "true"
