"""Carrying training checkpoints between machines through the team's MLflow server.

The training fan-out (`flows/fanout.py`) trains groups of styles on other workers, each in
its own clone. For the `dvc repro train` that follows on the machine that fanned out to
resume those styles instead of training them again, their final checkpoints must reach its
`checkpoints/` folder. The team already shares one thing every worker can write to and
every clone can read from: the MLflow tracking server with served artifacts
(`registry.tracking_uri: http://...`). So:

- :func:`publish` (on the worker, after training): logs the final checkpoint of a finished
  training run as the artifact `checkpoint/step-<n>/` of that same MLflow run (the run of
  the train stage, tagged `style` and `fingerprint`), and tags the run with the fan-out's
  batch id and the step.
- :func:`fetch` (on the machine that fanned out): finds the runs of a batch, downloads each
  checkpoint into `checkpoints/<style>/<fingerprint>/step-<n>/` (one rename: a crash never
  leaves a folder that looks complete), and loads it once to check it (file layout, finite
  LoRA weights, matching fingerprint) before keeping it.

A checkpoint is only resumed when its fingerprint (config, base model, curated data, training
code and library versions; `stunning.training.checkpoint`) equals the one the local train
stage computes, so a worker on other code or data never leaks into this clone's adapters:
the train stage then trains that style itself. With a local store (SQLite) there is nothing
shared to carry through; workers in one clone share `checkpoints/` directly.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stunning.config import RegistryConfig
from stunning.io import atomic_dir
from stunning.training.checkpoint import CheckpointStore

log = logging.getLogger(__name__)

BATCH_TAG = "fanout.batch"  # the fan-out that trained this run (one id per `fan_out` call)
STEP_TAG = "checkpoint.step"  # the step of the checkpoint logged under ARTIFACT
ARTIFACT = "checkpoint"


class CheckpointTransferError(RuntimeError):
    """A checkpoint could not be published to, or fetched from, the tracking server."""


@dataclass
class Carried:
    """One style's checkpoint as :func:`fetch` found it."""

    style: str
    fingerprint: str
    step: int
    run_id: str
    outcome: str  # "downloaded" or "already here"
    path: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def server_client(cfg: RegistryConfig, root: Path):
    """(MlflowClient, experiment id) for the team's tracking server, or None with a local store."""
    from mlflow import MlflowClient

    from stunning.mlflow_store import is_server_uri
    from stunning.tracking import configure_mlflow

    if not is_server_uri(cfg.tracking_uri):
        return None
    experiment_id = configure_mlflow(cfg, root)
    return MlflowClient(), experiment_id


def publish(cfg: RegistryConfig, root: Path, checkpoint_dir: Path, run_id: str, batch: str) -> dict[str, Any] | None:
    """Log the final checkpoint of the finished training run `run_id` to the tracking server
    (artifact `checkpoint/step-<n>/`) and tag the run with `batch`; returns what was logged,
    or None with a local store (nothing to share). Raises CheckpointTransferError when the run
    has no valid checkpoint in `checkpoint_dir`."""
    found = server_client(cfg, root)
    if found is None:
        log.info("registry.tracking_uri is a local store: the checkpoints of run %s stay in %s", run_id, checkpoint_dir)
        return None
    client, _ = found
    tags = client.get_run(run_id).data.tags
    style, fingerprint = tags.get("style"), tags.get("fingerprint")
    if not style or not fingerprint:
        raise CheckpointTransferError(f"MLflow run {run_id} has no `style`/`fingerprint` tags: it is not a training run")
    store = CheckpointStore.for_run(Path(checkpoint_dir), style, fingerprint, keep=1)
    latest = store.latest()
    if latest is None:
        raise CheckpointTransferError(
            f"no valid checkpoint of style {style!r} (fingerprint {fingerprint}) under {store.root}: "
            f"the training run {run_id} saves its last step there (train.keep_checkpoints >= 1)")
    client.log_artifacts(run_id, str(latest.path), artifact_path=f"{ARTIFACT}/step-{latest.step}")
    client.set_tag(run_id, STEP_TAG, str(latest.step))
    client.set_tag(run_id, BATCH_TAG, batch)  # last: a run tagged with the batch has its checkpoint
    log.info("published %s (style %s, step %d) to run %s", latest.path, style, latest.step, run_id)
    return {"style": style, "fingerprint": fingerprint, "step": latest.step, "run_id": run_id}


def fetch(cfg: RegistryConfig, root: Path, checkpoint_dir: Path, batch: str) -> list[Carried]:
    """Download the checkpoints published for `batch` into `checkpoint_dir` (see the module
    docstring); returns one :class:`Carried` per run, [] with a local store."""
    found = server_client(cfg, root)
    if found is None:
        return []
    client, experiment_id = found
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{BATCH_TAG}` = '{batch}'", max_results=1000)
    carried = []
    for run in runs:
        tags = run.data.tags
        style, fingerprint, step = tags["style"], tags["fingerprint"], int(tags[STEP_TAG])
        store = CheckpointStore.for_run(Path(checkpoint_dir), style, fingerprint, keep=1)
        target = store.root / f"step-{step}"
        outcome = "already here" if _loads(store, target) else "downloaded"
        if outcome == "downloaded":
            _download(client, run.info.run_id, store, target, cfg.tracking_uri)
        log.info("checkpoint of style %s (step %d) from run %s: %s", style, step, run.info.run_id, outcome)
        carried.append(Carried(style, fingerprint, step, run.info.run_id, outcome, str(target)))
    return sorted(carried, key=lambda c: c.style)


def _loads(store: CheckpointStore, folder: Path) -> bool:
    if not folder.is_dir():
        return False
    try:
        store.load(folder)
    except Exception:  # noqa: BLE001 -- a broken local copy is replaced by the published one
        return False
    return True


def _download(client, run_id: str, store: CheckpointStore, target: Path, uri: str) -> None:
    """The run's `checkpoint/step-<n>/` files into `target` (step-<n>), checked by loading them
    and only then published with one rename: a checkpoint that does not load is never kept."""
    artifact = f"{ARTIFACT}/{target.name}"
    with atomic_dir(target) as tmp, tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.") as scratch:
        got = Path(client.download_artifacts(run_id, artifact, scratch))
        files = [p for p in got.iterdir() if p.is_file()] if got.is_dir() else []
        if not files:  # MLflow returns an empty folder, not an error, when the files are gone
            raise CheckpointTransferError(
                f"MLflow run {run_id} on {uri} is tagged with a checkpoint ({target.name}), but its artifact "
                f"{artifact} is empty or missing on the server (its artifact store lost the files?)")
        for p in files:
            shutil.move(str(p), tmp / p.name)
        try:
            store.load(tmp)
        except Exception as exc:
            raise CheckpointTransferError(
                f"the checkpoint of style {target.parent.parent.name!r} from MLflow run {run_id} on {uri} does not "
                f"load ({exc}); nothing was kept. Run the fan-out again, or train that style here "
                f"(`dvc repro train`).") from exc
