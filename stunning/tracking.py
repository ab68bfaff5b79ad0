"""Experiment tracking behind a small interface, so core code is testable without MLflow.

`Tracker` is what training and validation talk to; `MlflowTracker` records to an MLflow
SQLite backend with artifacts under `mlruns/` (MLflow 3 refuses the plain file store) or to
a shared tracking server (`registry.tracking_uri: http://HOST:PORT`), and
`NullTracker` records nothing (unit tests, dry runs). `configure_mlflow` is the one place
that points MLflow at the project's store (checked and relocated by `stunning.mlflow_store`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from stunning.config import RegistryConfig

log = logging.getLogger(__name__)

BATCH_METRICS = 1000  # MLflow's limit on the metrics of one log_batch request


class Tracker(Protocol):
    def start_run(self, name: str, tags: dict[str, str] | None = None) -> str: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_metric_steps(self, entries: Sequence[tuple[int, dict[str, float]]]) -> None:
        """Many steps' metrics at once, e.g. a loss curve: [(step, {name: value}), ...]."""
        ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def end_run(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Records nothing; run ids are stable placeholders so callers need no special case."""

    def __init__(self) -> None:
        self._n = 0

    def start_run(self, name: str, tags: dict[str, str] | None = None) -> str:
        self._n += 1
        return f"null-{self._n}"

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_metric_steps(self, entries: Sequence[tuple[int, dict[str, float]]]) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def end_run(self, status: str = "FINISHED") -> None:
        pass


# `mlflow ui` opens an experiment in its GenAI overview unless this tag says it holds model
# training runs; with it, the UI shows the runs table, metrics and the model registry.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def configure_mlflow(cfg: RegistryConfig, root: Path | None = None) -> str:
    """Point MLflow at the store (or tracking server) and artifact root of `cfg`; return the
    experiment id.

    With a tracking server (`http(s)://`) the experiment is created without a client-side
    artifact location: the server's `--serve-artifacts` store holds the artifacts
    (`mlflow-artifacts:/` URIs), never a path on this machine. Two machines creating the
    experiment at once both end up with the one the server kept.

    Relative paths in `cfg` are resolved against `root` (default: the working directory), so
    a stage run from the project root and a test run in a temporary clone both work. The
    store is checked and relocated first (:func:`stunning.mlflow_store.open_store`): a
    corrupt or locked database raises :class:`~stunning.mlflow_store.TrackingStoreError`
    (locks after bounded retries), and a copied project's store is pointed at its own
    `mlruns/artifacts`.
    """
    import mlflow

    from stunning.mlflow_store import is_server_uri, open_store, sqlite_path, with_lock_retries

    root = Path(root or Path.cwd()).resolve()
    uri, artifacts = open_store(cfg, root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)

    def experiment() -> str:
        from mlflow.exceptions import MlflowException

        exp = mlflow.get_experiment_by_name(cfg.experiment)
        if exp is None:
            location = {} if artifacts is None else {"artifact_location": artifacts.as_uri()}
            try:
                return mlflow.create_experiment(
                    cfg.experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}, **location,
                )
            except MlflowException as exc:  # another client created it since the lookup
                exp = mlflow.get_experiment_by_name(cfg.experiment)
                if exc.error_code != "RESOURCE_ALREADY_EXISTS" or exp is None:
                    raise
        if artifacts is None and (exp.artifact_location or "").startswith(("file:", "/")):
            from stunning.mlflow_store import TrackingStoreError

            raise TrackingStoreError(
                f"experiment {cfg.experiment!r} on the MLflow server {uri} stores its artifacts at "
                f"{exp.artifact_location}, a path on one machine (it was created by a client with a local artifact "
                f"root, or by a server without --serve-artifacts). Set registry.experiment in params.yaml to a new "
                f"name (it is created with served artifacts), or delete that experiment on the server."
            )
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # a store made before the tag existed
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id

    if is_server_uri(uri):
        exp_id = experiment()
    else:
        exp_id = with_lock_retries(sqlite_path(cfg, root) or Path(uri), experiment)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


class MlflowTracker:
    """A `Tracker` that records to MLflow (call :func:`configure_mlflow` first)."""

    def __init__(self) -> None:
        import mlflow

        self._mlflow = mlflow

    def start_run(self, name: str, tags: dict[str, str] | None = None) -> str:
        run = self._mlflow.start_run(run_name=name, tags=tags or {})
        return run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        self._mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_metric_steps(self, entries: Sequence[tuple[int, dict[str, float]]]) -> None:
        """One `log_batch` request per BATCH_METRICS values instead of one per step: a run's
        800-step loss curve took ~800 SQLite transactions (~5-10 ms each) before."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(step)) for step, values in entries for k, v in values.items()]
        if not metrics:
            return
        client, run_id = self._mlflow.MlflowClient(), self._mlflow.active_run().info.run_id
        for i in range(0, len(metrics), BATCH_METRICS):
            client.log_batch(run_id, metrics=metrics[i:i + BATCH_METRICS])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)

    def end_run(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)
