"""The MLflow model registry behind a few functions: register, compare, roll back, resolve.

Every candidate that reaches the register stage becomes a new version of
`registry.model_name`, promoted or not, so `mlflow ui` shows the whole history with the gate
verdict on each version. A version is an MLflow pyfunc model (:class:`StunningStyleModel`)
whose artifacts are the style adapters, the blends, the gate report, the params snapshot, a
small manifest and, when under :data:`BASE_COPY_LIMIT_MB`, the base model itself (a larger
base is referred to by path: tag `base_path`).

Aliases carry the promotion state (MLflow stages are deprecated): a version that passed the
gate becomes `@champion` and the champion it replaces becomes `@previous-champion`, the
rollback target. A failed version is registered with `gate=failed`, `promoted=false` and
leaves `@champion` where it was. Gate metrics are tagged on the version (e.g.
`style_gain/noir`) so the next run's gate can compare against the champion
(:func:`champion_metrics`).

The registry is local (`registry.tracking_uri: sqlite:///mlruns/mlflow.db`) or a team's
`mlflow server --serve-artifacts` (`http://HOST:PORT`): the same calls, with artifacts
uploaded to and downloaded from the server (downloaded versions are cached under
`registry.artifact_root`, see :func:`resolve`).

**Compare-and-set promotion.** Two machines may finish at once, each gated against the same
champion. `@champion` moves only if it still is the champion the gate compared against
(`expected_champion`, from `reports/champion.json`); the loser is registered (complete),
not promoted, tagged `promotion: lost race to version N`. MLflow has no atomic
compare-and-set on aliases, so the read-check-move runs under :func:`promotion_lock`: a
lock *registered model* `<model_name>.promotion-lock`, whose creation is atomic in the
server's database (the name is its primary key: exactly one concurrent create succeeds).
The lock is held for the ~10 calls that read and move the aliases, never for uploads
(measured on localhost, PostgreSQL backend, a loaded 2-core machine: taking and releasing
it 75 ms, a register's hold 0.4-0.5 s, up to 4 s under heavy load). What remains: a holder
stalled longer than :data:`LOCK_TTL_S` loses the lock to a waiter (it re-checks its token
right before moving the alias, leaving one HTTP round trip, 20-50 ms measured), and two
waiters breaking the same stale lock of a crashed holder could both win within one round
trip of each other; a writer that bypasses the lock (the MLflow UI) is not serialised.

MLflow stays behind this module and `stunning.tracking`; nothing else imports it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
import mlflow.pyfunc
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from stunning.config import RegistryConfig
from stunning.mlflow_store import TrackingStoreError, is_server_uri, sqlite_path
from stunning.style_model import LORA_FILE, MANIFEST_NAME, GenerateRequest, StyleModel
from stunning.tracking import configure_mlflow

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous-champion"
BASE_COPY_LIMIT_MB = 200.0
MAX_TAG_CHARS = 4000  # MLflow caps tag values at 5000 characters
RUN_STAGE_TAG = "register"
# Version tags the registry itself writes; a gate metric of the same name is not tagged.
RESERVED_TAGS = frozenset(
    {
        "gate",
        "gate_reasons",
        "base_family",
        "base",
        "base_path",
        "styles",
        "blends",
        "metric_keys",
        "promoted",
        "previous_champion_version",
        "superseded_by",
        "rolled_back",
        "rollback_reason",
        "restored_by_rollback_from",
        "content_hash",
        "gate_mode",
        "dry_run",
        "experiment",
        "promoted_by",
        "not_promoted_reason",
        "registration",
        "gate_digest",
        "promotion",
    }
)
# A version is created with `registration: pending` (all its gate tags set at creation) and
# marked `complete` once its aliases are set. A register killed in between leaves a pending
# version; the rerun with the same candidate and gate report finishes that version instead
# of creating another (same version number as an uninterrupted run), and marks any other
# pending version `abandoned`.
REGISTRATION = "registration"
GATE_MODES = ("enabled", "dry_run", "disabled")

# Requirements recorded with the model; listing them skips MLflow's inference, which would
# load the model in a subprocess at registration time.
REQUIREMENTS = ("torch", "diffusers", "transformers", "peft", "safetensors", "pillow", "pydantic", "mlflow")

PYFUNC_ENTRY = '''"""MLflow models-from-code entry point of a Stunning Engine style model."""
import mlflow

from stunning.registry import StunningStyleModel

mlflow.models.set_model(StunningStyleModel())
'''


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: `expected_champion` not given: compare with the champion read when the operation started.
UNSET: Any = _Unset()


class RegistryError(ValueError):
    """A registry operation that cannot proceed as asked; the message says what to do."""


class NoChampionError(RegistryError, LookupError):
    """No registry, no registered model, or no version under the requested alias."""


class RegistryStoreError(RegistryError, TrackingStoreError):
    """The MLflow store is corrupt or locked (:mod:`stunning.mlflow_store`); the message names
    the file and the recovery. A `RegistryError`, so stages and the CLI report it cleanly."""


class StunningStyleModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of a registered style model.

    `predict` takes a list of requests (dicts with `prompt` and optional `style`/`blend`,
    `seed`, `steps`, `guidance_scale`) or a pandas DataFrame with those columns, and returns
    one base64-encoded PNG per request. Pass `model_config={"device": "cpu"}` to
    `mlflow.pyfunc.load_model` to choose the device (default: the best available).
    """

    def load_context(self, context) -> None:
        device = (context.model_config or {}).get("device")
        self.model = StyleModel.load(context.artifacts, device=device)

    def predict(self, context, model_input: list[GenerateRequest], params: dict[str, Any] | None = None) -> list[str]:
        return [self.model.generate_base64(req) for req in model_input]


# --------------------------------------------------------------------------- helpers


def _store_exists(cfg: RegistryConfig, root: str | Path | None) -> bool:
    if is_server_uri(cfg.tracking_uri):
        return True  # the server's; whether it answers is checked when the client is made
    db = sqlite_path(cfg, root)
    return db is None or db.is_file()


def _client(cfg: RegistryConfig, root: str | Path | None) -> MlflowClient:
    try:
        configure_mlflow(cfg, Path(root) if root else None)
    except TrackingStoreError as exc:
        raise RegistryStoreError(str(exc)) from exc
    return MlflowClient()


def _existing_client(cfg: RegistryConfig, root: str | Path | None) -> MlflowClient:
    """A client for a store that already exists; never creates an empty database."""
    if not _store_exists(cfg, root):
        raise NoChampionError(f"no MLflow registry at {sqlite_path(cfg, root)} yet.")
    return _client(cfg, root)


def _aliases(client: MlflowClient, name: str) -> dict[str, int]:
    # `search_model_versions` leaves `aliases` empty in MLflow 3; the registered model has them.
    try:
        return {a: int(v) for a, v in client.get_registered_model(name).aliases.items()}
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


def _versions(client: MlflowClient, name: str) -> list[int]:
    return sorted(int(mv.version) for mv in client.search_model_versions(f"name = '{name}'"))


def _tag_key(name: str) -> str:
    """MLflow tag/metric keys allow letters, digits, `_ - . / :` and spaces."""
    return re.sub(r"[^\w\-./: ]", "_", str(name)).strip() or "_"


def _fmt(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _truncate(text: str, limit: int = MAX_TAG_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 15] + " …(truncated)"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))


def _flatten_numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    if _is_number(obj):
        return {prefix: float(obj)} if prefix else {}
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(_flatten_numbers(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def gate_metrics(gate: dict[str, Any]) -> dict[str, float]:
    """The numbers a later gate compares against: the gate report's `candidate.metrics`
    (and top-level `metrics`), nested dicts flattened with `/` (e.g. `style_gain/noir`).
    Only a report without metrics falls back to its numeric check values, by check name
    (the checks are tagged as `check.<name>` in any case)."""
    metrics: dict[str, float] = {}
    candidate = gate.get("candidate") if isinstance(gate.get("candidate"), dict) else {}
    for source in (candidate.get("metrics"), gate.get("metrics")):
        if isinstance(source, dict):
            metrics.update(_flatten_numbers(source))
    if not metrics:
        for check in gate.get("checks") or []:
            if isinstance(check, dict) and _is_number(check.get("value")) and check.get("name"):
                metrics.setdefault(str(check["name"]), float(check["value"]))
    return {_tag_key(k): v for k, v in metrics.items()}


def _dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / (1024 * 1024)


def _requirements() -> list[str]:
    reqs = []
    for name in REQUIREMENTS:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def _flat_params(snapshot: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for section, values in snapshot.items():
        if isinstance(values, dict):
            for key, value in values.items():
                out[_tag_key(f"{section}.{key}")] = json.dumps(value)[:6000] if not isinstance(value, str) else value
        else:
            out[_tag_key(section)] = str(values)
    return out


def describe_result(result: dict[str, Any]) -> str:
    """The one-line verdict a person reads: promoted or blocked, and where @champion is."""
    version = result["version"]
    if result["promoted"]:
        prev = result.get("previous_champion_version")
        kept = f"previous v{prev} kept as @{PREVIOUS}" if prev else "first champion"
        return f"PROMOTED v{version} to @{CHAMPION} ({kept})"
    reasons = "; ".join(result.get("reasons") or []) or "the gate did not pass"
    champ = result.get("champion_version")
    stays = f"@{CHAMPION} stays v{champ}" if champ else f"there is no @{CHAMPION} yet"
    if result.get("gate_passed") and result.get("not_promoted_reasons"):
        return f"REGISTERED v{version}, not promoted: {'; '.join(result['not_promoted_reasons'])}; {stays}"
    return f"BLOCKED v{version}: {reasons}; {stays}"


def content_hash(adapters_dir: str | Path) -> str | None:
    """SHA-256 over the adapter weight files (`<style>/pytorch_lora_weights.safetensors`, by
    relative path and content): equal for the same weights wherever they lie, None if none."""
    root = Path(adapters_dir)
    files = sorted(root.glob(f"*/{LORA_FILE}")) if root.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(f.read_bytes()).hexdigest().encode() + b"\n")
    return digest.hexdigest()


def promotion_decision(
    gate_passed: bool,
    mode: str = "enabled",
    experiment: str | None = None,
    promote_experiments: bool = False,
    rolled_back_versions: list[int] | None = None,
) -> tuple[bool, list[str]]:
    """Whether a registered candidate moves `@champion`, and why not (pure).

    Only an `enabled` gate that passed promotes; a `dry_run` or `disabled` gate never does,
    a `dvc exp run` experiment only with `registry.promote_experiments`, and never a
    candidate whose adapter content equals a version that was rolled back (and is not the
    champion again).
    """
    if mode not in GATE_MODES:
        raise RegistryError(f"gate.mode={mode!r}: expected one of {', '.join(GATE_MODES)}")
    why: list[str] = []
    if mode == "dry_run":
        why.append("gate.mode is dry_run: evaluated and registered, never promoted")
    elif mode == "disabled":
        why.append("gate.mode is disabled: checks skipped, never promoted automatically")
    elif not gate_passed:
        return False, []
    if experiment and not promote_experiments:
        why.append(
            f"DVC experiment {experiment!r}: registered for comparison; registry.promote_experiments is false "
            "(promote it with `stunning promote VERSION`)"
        )
    if rolled_back_versions:
        listed = ", ".join(f"v{v}" for v in rolled_back_versions)
        why.append(f"same adapter content as rolled-back {listed}: not re-promoted over the rollback")
    return not why, why


# --------------------------------------------------------------------------- registration


def _stage_artifacts(
    staging: Path,
    gate: dict[str, Any],
    candidate_dir_map: dict[str, Path],
    base_path: Path,
    base_family: str,
    params_snapshot: dict[str, Any],
    model_name: str,
    base_copy_limit_mb: float,
) -> tuple[dict[str, str], dict[str, Any]]:
    """Copy everything a version carries into `staging`; return (pyfunc artifacts, manifest)."""
    from stunning.io import write_json

    artifacts: dict[str, str] = {}
    contents: dict[str, list[str]] = {}
    for key, src in candidate_dir_map.items():
        dest = staging / _tag_key(key)
        if src is not None and Path(src).is_dir():
            shutil.copytree(src, dest)
        else:
            dest.mkdir()  # an empty folder keeps the artifact layout the same for every version
        artifacts[key] = str(dest)
        contents[key] = sorted(p.parent.name for p in dest.glob(f"*/{LORA_FILE}"))

    base_size = _dir_size_mb(base_path)
    bundle_base = base_size <= base_copy_limit_mb
    if bundle_base:
        shutil.copytree(base_path, staging / "base")
        artifacts["base"] = str(staging / "base")
    manifest = {
        "format": 1,
        "model_name": model_name,
        "family": base_family,
        "base": "artifact" if bundle_base else "external",
        "base_path": str(Path(base_path).resolve()),
        "base_size_mb": round(base_size, 2),
        "styles": contents.get("adapters", []),
        "blends": contents.get("blends", []),
        "gate_passed": bool(gate.get("passed")),
    }
    write_json(staging / MANIFEST_NAME, manifest)
    write_json(staging / "gate.json", gate)
    write_json(staging / "params.json", params_snapshot)
    artifacts.update(
        manifest=str(staging / MANIFEST_NAME),
        gate=str(staging / "gate.json"),
        params=str(staging / "params.json"),
    )
    return artifacts, manifest


def _version_tags(gate: dict[str, Any], metrics: dict[str, float], manifest: dict[str, Any]) -> dict[str, str]:
    passed = bool(gate.get("passed"))
    tags = {
        "gate": "passed" if passed else "failed",
        "gate_reasons": _truncate("; ".join(str(r) for r in gate.get("reasons") or []) or "none"),
        "base_family": manifest["family"],
        "base": manifest["base"],
        "styles": ",".join(manifest["styles"]),
        "blends": ",".join(manifest["blends"]),
    }
    if manifest["base"] == "external":
        tags["base_path"] = manifest["base_path"]
    quantization = gate.get("quantization")
    if isinstance(quantization, dict):  # the quantization ladder's choice (reports/quantize.json via the gate)
        tags["quantization.level"] = str(quantization.get("level") or "none")
        tags["quantization.why"] = _truncate(str(quantization.get("why") or ""))
    for check in gate.get("checks") or []:
        if not isinstance(check, dict) or not check.get("name"):
            continue
        # pass | fail | not_measured (gate reports before verdicts existed: from `passed`)
        verdict = check.get("verdict") or ("pass" if check.get("passed") else "fail")
        tags[f"check.{_tag_key(check['name'])}"] = (
            f"{_fmt(check.get('value'))}/{_fmt(check.get('threshold'))}/{verdict}"
        )
    tagged = []
    for key, value in sorted(metrics.items()):
        if key in tags or key in RESERVED_TAGS or key.startswith("check."):
            log.warning("gate metric %r clashes with a registry tag of the same name; not tagged", key)
            continue
        tags[key] = repr(value)
        tagged.append(key)
    # Lists which tags are metrics, so `champion_metrics` never mistakes another numeric tag.
    tags["metric_keys"] = _truncate(",".join(tagged))
    return tags


def register_candidate(
    cfg: RegistryConfig,
    gate: dict[str, Any],
    candidate_dir_map: dict[str, Path],
    base_path: Path,
    base_family: str,
    params_snapshot: dict[str, Any],
    root: str | Path | None = None,
    base_copy_limit_mb: float = BASE_COPY_LIMIT_MB,
    *,
    mode: str = "enabled",
    experiment: str | None = None,
    promote_experiments: bool = False,
    expected_champion: int | None = UNSET,
) -> dict[str, Any]:
    """Register the candidate as a new version; move `@champion` only if the gate passed
    and :func:`promotion_decision` allows it (gate `mode`, a DVC `experiment` run, content
    equal to a rolled-back version's or the champion's).

    Compare-and-set: `expected_champion` is the champion version the gate compared against
    (None: no champion; default: the one registered when this call starts). Under
    :func:`promotion_lock`, `@champion` moves only if the champion this candidate would be
    compared with now (see :func:`champion_record`) still is that one; otherwise the version
    is completed unpromoted with tag `promotion: lost race to version N` and the reason in
    `not_promoted_reasons` (`lost_race_to` in the result).

    `candidate_dir_map` maps artifact names to folders: `adapters` (required, one
    `<style>/pytorch_lora_weights.safetensors` each) and `blends` (may be missing or empty);
    other names are logged as extra artifacts. Returns `{"model_name", "version",
    "promoted", "champion_version", "previous_champion_version", "reasons", ...}`.
    """
    from stunning.families import ModelNotFoundError

    if "passed" not in gate or not isinstance(gate["passed"], bool):
        raise RegistryError("the gate report has no boolean 'passed' verdict; rerun the validate stage")
    adapters = candidate_dir_map.get("adapters")
    if adapters is None or not _adapter_names(Path(adapters)):
        raise RegistryError(
            f"no adapters to register in {adapters}: expected <style>/{LORA_FILE} folders; run the train stage first"
        )
    base_path = Path(base_path)
    if not (base_path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"base model folder {base_path} is missing or not a diffusers folder (no model_index.json); "
            "pass the base.path the candidate was trained on (build the embedded one with `dvc repro base_model`)"
        )

    name = cfg.model_name
    client = _client(cfg, root)
    versions = _versions(client, name) if _registered(client, name) else []
    n = (versions[-1] + 1) if versions else 1
    passed = gate["passed"]
    reasons = [str(r) for r in gate.get("reasons") or []]
    metrics = gate_metrics(gate)
    digest = content_hash(adapters)
    before = _aliases(client, name) if versions else {}
    existing = {v: client.get_model_version(name, str(v)) for v in versions}  # read once, used twice below
    rolled_back = []
    for v, mv in existing.items():
        vtags = mv.tags
        if digest is not None and vtags.get("content_hash") == digest and vtags.get("rolled_back") == "true" \
                and before.get(CHAMPION) != v:
            rolled_back.append(v)
    promote, held = promotion_decision(passed, mode, experiment, promote_experiments, rolled_back)
    gate_digest = _digest(gate)
    resumed = _pending_registration(existing, digest, gate_digest)
    if expected_champion is UNSET:
        expected_champion = _walk_champion(client, name, before.get(CHAMPION), digest)[0]

    extra = {"gate_mode": mode, "content_hash": digest or "none", "gate_digest": gate_digest, REGISTRATION: "pending"}
    if mode == "dry_run":
        extra["dry_run"] = "true"
    if mode == "disabled":
        extra["gate"] = "disabled"
    if experiment:
        extra["experiment"] = _truncate(experiment)
    if held:
        extra["not_promoted_reason"] = _truncate("; ".join(held))
    if resumed is not None:
        version, run_id, created_ms = resumed, existing[resumed].run_id, existing[resumed].creation_timestamp
        manifest = _manifest_of(existing[resumed].tags)
        log.info("finishing the interrupted registration of v%s (same candidate and gate report)", version)
    else:
        with tempfile.TemporaryDirectory(prefix="stunning-register-") as tmp:
            staging = Path(tmp)
            artifacts, manifest = _stage_artifacts(
                staging, gate, dict(candidate_dir_map), base_path, base_family, params_snapshot, name,
                base_copy_limit_mb,
            )
            entry = staging / "stunning_pyfunc.py"
            entry.write_text(PYFUNC_ENTRY)
            with mlflow.start_run(
                run_name=f"register-{n}",
                tags={"stage": RUN_STAGE_TAG, "gate": "passed" if passed else "failed"},
                nested=mlflow.active_run() is not None,
            ) as run:
                if params_snapshot:
                    mlflow.log_params(_flat_params(params_snapshot))
                if metrics:
                    mlflow.log_metrics(metrics)
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(entry),
                    artifacts=artifacts,
                    pip_requirements=_requirements(),
                    metadata={"stunning_manifest": manifest},
                )
                run_id = run.info.run_id
        # The version is created with every tag at once (one call), so it is never seen untagged.
        created = mlflow.register_model(
            info.model_uri, name, tags={**_version_tags(gate, metrics, manifest), **extra},
        )
        version, created_ms = int(created.version), created.creation_timestamp

    lost_to: int | None = None
    with promotion_lock(client, name) as token:
        _abandon_pending(client, name, keep=version)
        current = _aliases(client, name)
        champion = current.get(CHAMPION)
        previous = current.get(PREVIOUS)
        if promote:
            compared = _walk_champion(client, name, champion, digest)[0]
            if compared != expected_champion or not _still_held(client, name, token):
                why = lost_race_reason(expected_champion, champion) if compared != expected_champion else (
                    f"promotion: the promotion lock expired while held (over {LOCK_TTL_S:g} s); not promoted")
                promote, lost_to = False, champion
                held.append(why)
                client.set_model_version_tag(name, str(version), "promotion", _truncate(why.removeprefix("promotion: ")))
                client.set_model_version_tag(name, str(version), "not_promoted_reason", _truncate("; ".join(held)))
                log.warning("v%s: %s", version, why)
        if promote:
            if champion is not None and champion != version:
                client.set_registered_model_alias(name, PREVIOUS, str(champion))
                client.set_model_version_tag(name, str(champion), "superseded_by", str(version))
                previous = champion
            client.set_registered_model_alias(name, CHAMPION, str(version))
            client.set_model_version_tag(name, str(version), "promoted", "true")
            if previous is not None:
                client.set_model_version_tag(name, str(version), "previous_champion_version", str(previous))
            champion = version
        else:
            client.set_model_version_tag(name, str(version), "promoted", "false")
        client.set_model_version_tag(name, str(version), REGISTRATION, "complete")

    result = {
        "model_name": name,
        "version": version,
        "promoted": promote,
        "champion_version": champion,
        "previous_champion_version": previous,
        "reasons": reasons + held,
        "not_promoted_reasons": held,
        "gate_passed": passed,
        "gate_mode": mode,
        "experiment": experiment,
        "expected_champion": expected_champion,
        "lost_race_to": lost_to,
        "content_hash": digest,
        "rolled_back_same_content": rolled_back,
        "run_id": run_id,
        "model_uri": f"models:/{name}/{version}",
        "created": _iso_utc(created_ms),
        "base_bundled": manifest["base"] == "artifact",
        "styles": manifest["styles"],
        "blends": manifest["blends"],
        "metrics": metrics,
    }
    result["verdict"] = describe_result(result)
    client.update_model_version(name, str(version), description=result["verdict"])
    log.info("%s", result["verdict"])
    return result


def _digest(report: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(report, sort_keys=True, default=str).encode()).hexdigest()


def _pending_registration(existing: dict[int, Any], content: str | None, gate_digest: str) -> int | None:
    """The interrupted (`pending`) version this registration finishes, if any.

    A pending version with the same adapter content and gate report is the same
    registration, cut short after the version was created: it is finished, not duplicated.
    """
    for v, mv in sorted(existing.items()):
        tags = mv.tags
        if tags.get(REGISTRATION) == "pending" and content is not None and tags.get("content_hash") == content \
                and tags.get("gate_digest") == gate_digest:
            return v
    return None


def _abandon_pending(client: MlflowClient, name: str, keep: int) -> None:
    """Mark every other `pending` version `abandoned` (its description says so).

    Called under :func:`promotion_lock` with fresh reads, and a registration completes its
    version under the same lock, so one that has completed is never marked; one still in
    flight on another machine may be marked, and then completes it (tag and description are
    overwritten). An abandoned version never holds an alias: aliases are set only after a
    version's tags.
    """
    for mv in client.search_model_versions(f"name = '{name}'"):
        v = int(mv.version)
        if v == keep or mv.tags.get(REGISTRATION) != "pending":
            continue
        client.set_model_version_tag(name, str(v), REGISTRATION, "abandoned")
        client.update_model_version(
            name, str(v), description=f"v{v}: registration interrupted and not resumed (another candidate "
            "was registered next); never promoted",
        )
        log.warning("v%s: an interrupted registration of another candidate, marked abandoned", v)


def _manifest_of(tags: dict[str, str]) -> dict[str, Any]:
    """What the registration result needs of a version's manifest, from its creation tags."""
    return {
        "family": tags.get("base_family"),
        "base": tags.get("base"),
        "styles": [s for s in tags.get("styles", "").split(",") if s],
        "blends": [b for b in tags.get("blends", "").split(",") if b],
    }


def _adapter_names(folder: Path) -> list[str]:
    return sorted(p.parent.name for p in Path(folder).glob(f"*/{LORA_FILE}")) if Path(folder).is_dir() else []


def _registered(client: MlflowClient, name: str) -> bool:
    try:
        client.get_registered_model(name)
        return True
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


# --------------------------------------------------------------------------- compare-and-set promotion

LOCK_SUFFIX = ".promotion-lock"
#: A lock held this long (by the waiter's own clock) belongs to a crashed holder and is broken.
LOCK_TTL_S = 30.0
#: How long a promotion waits for another one's lock before giving up with an error.
LOCK_WAIT_S = 90.0
LOCK_POLL_S = 0.2
#: A lock whose holder-declared expiry is this far in the past (wall clocks) is broken at once.
LOCK_CLOCK_SKEW_S = 60.0


class PromotionLockTimeout(RegistryError):
    """Another promotion held the registry's promotion lock for longer than the wait."""


def _lock_tags(client: MlflowClient, lock: str) -> dict[str, str]:
    try:
        return dict(client.get_registered_model(lock).tags)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


def _release(client: MlflowClient, lock: str, token: str) -> bool:
    """Delete `lock` if it still carries `token`; True if it did (or it was gone)."""
    held = _lock_tags(client, lock)
    if not held:
        return True
    if held.get("token") != token:
        return False
    try:
        client.delete_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    return True


def _still_held(client: MlflowClient, name: str, token: str) -> bool:
    return _lock_tags(client, name + LOCK_SUFFIX).get("token") == token


@contextmanager
def promotion_lock(
    client: MlflowClient,
    name: str,
    *,
    ttl_s: float = LOCK_TTL_S,
    wait_s: float = LOCK_WAIT_S,
    poll_s: float = LOCK_POLL_S,
) -> Iterator[str]:
    """Hold the promotion lock of model `name`; yields this holder's token.

    The lock is the registered model `<name>.promotion-lock` (tags: `token`, `holder`,
    `expires`): creating a registered model is atomic in MLflow's SQL store (local SQLite or
    a server's database), so of concurrent creators exactly one succeeds; the others poll.
    A lock seen unchanged for `ttl_s` (by the waiter's monotonic clock), or whose declared
    expiry passed more than :data:`LOCK_CLOCK_SKEW_S` ago, was left by a crashed holder and
    is broken (deleted only if it still carries the token seen). Raises
    :class:`PromotionLockTimeout` after `wait_s`.
    """
    lock = name + LOCK_SUFFIX
    token = uuid.uuid4().hex
    holder = f"{socket.gethostname()}:{os.getpid()}"
    started = time.monotonic()
    first_seen: dict[str, float] = {}
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"token": token, "holder": holder, "expires": f"{time.time() + ttl_s:.3f}"},
                description=f"Promotion lock of {name}: held by {holder} while it moves @{CHAMPION}; deleted when "
                f"done. Left behind by a crashed promotion, it is broken after {ttl_s:g} s.",
            )
            break
        except MlflowException as exc:
            # ALREADY_EXISTS: held; DOES_NOT_EXIST: released between the failed insert and its lookup
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        held = _lock_tags(client, lock)
        if held:
            other = held.get("token", "")
            seen = first_seen.setdefault(other, time.monotonic())
            try:
                expires = float(held.get("expires", "0"))
            except ValueError:
                expires = 0.0
            if time.monotonic() - seen >= ttl_s or time.time() > expires + LOCK_CLOCK_SKEW_S:
                log.warning("breaking the stale promotion lock %s held by %s", lock, held.get("holder", "?"))
                _release(client, lock, other)
                continue
            if time.monotonic() - started >= wait_s:
                raise PromotionLockTimeout(
                    f"{name}: another promotion ({held.get('holder', '?')}) has held the registry's promotion lock "
                    f"(registered model {lock!r}) for over {wait_s:g} s; try again later. If its holder died, the "
                    f"lock is broken automatically after {ttl_s:g} s, or delete that registered model by hand."
                )
        time.sleep(poll_s)
    acquired = time.monotonic()
    try:
        yield token
    finally:
        log.debug("promotion lock %s: waited %.3f s, held %.3f s", lock, acquired - started, time.monotonic() - acquired)
        try:
            if not _release(client, lock, token):
                log.warning("promotion lock %s was taken over while held (held longer than %g s)", lock, ttl_s)
        except Exception:  # never hide the body's own error; a left lock expires
            log.warning("could not release the promotion lock %s; it expires after %g s", lock, ttl_s, exc_info=True)


def _walk_champion(
    client: MlflowClient, name: str, champion: int | None, candidate_hash: str | None
) -> tuple[int | None, dict[str, str]]:
    """(version, tags) of the champion a candidate with `candidate_hash` is compared with:
    `champion`, or, when that has the candidate's own content (it was just promoted), the
    champion it replaced, and so on back (the `champion` stage's rule)."""
    version, tags = champion, {}
    seen: set[int] = set()
    while version is not None and version not in seen:
        seen.add(version)
        tags = dict(client.get_model_version(name, str(version)).tags)
        if candidate_hash is None or tags.get("content_hash") != candidate_hash:
            return version, tags
        older = tags.get("previous_champion_version")
        version = int(older) if older and older.isdigit() else None
    return None, {}


def _champion_name(version: int | None) -> str:
    return f"v{version}" if version is not None else "no champion"


def lost_race_reason(expected: int | None, current: int | None) -> str:
    """Why a candidate gated against `expected` is not promoted when `@champion` is `current`."""
    if current is None:
        return (f"promotion: lost race: @{CHAMPION} was removed while this candidate was registered "
                f"(the gate compared against {_champion_name(expected)}); rerun the pipeline to re-validate")
    return (f"promotion: lost race to version {current} (the gate compared against {_champion_name(expected)}; "
            f"@{CHAMPION} moved to v{current} while this candidate was registered); rerun the pipeline to "
            f"validate against v{current}")


# --------------------------------------------------------------------------- queries


def champion_metrics(cfg: RegistryConfig, root: str | Path | None = None) -> dict[str, float] | None:
    """The `@champion` version's gate metrics (from its tags), or None when there is no
    registry database, no registered model or no champion. Never creates a database."""
    if not _store_exists(cfg, root):
        return None
    client = _client(cfg, root)
    champion = _aliases(client, cfg.model_name).get(CHAMPION)
    if champion is None:
        return None
    tags = client.get_model_version(cfg.model_name, str(champion)).tags
    keys = [k for k in tags.get("metric_keys", "").split(",") if k]
    out: dict[str, float] = {}
    for key in keys:
        try:
            out[key] = float(tags[key])
        except (KeyError, ValueError):
            log.warning("champion v%s: metric tag %r missing or not a number", champion, key)
    return out


def aliases(cfg: RegistryConfig, root: str | Path | None = None) -> dict[str, int]:
    """Alias → version of the registered model (empty without a registry or model)."""
    if not _store_exists(cfg, root):
        return {}
    return _aliases(_client(cfg, root), cfg.model_name)


def list_versions(cfg: RegistryConfig, root: str | Path | None = None) -> list[dict[str, Any]]:
    """Every version of the registered model, newest first: `{"version", "aliases", "created",
    "tags"}` (aliases sorted; created ISO 8601 UTC). Empty without a registry or model; never
    creates a database."""
    if not _store_exists(cfg, root):
        return []
    client = _client(cfg, root)
    if not _registered(client, cfg.model_name):
        return []
    by_version: dict[int, list[str]] = {}
    for alias, version in _aliases(client, cfg.model_name).items():
        by_version.setdefault(version, []).append(alias)
    out = []
    for mv in client.search_model_versions(f"name = '{cfg.model_name}'"):
        version = int(mv.version)
        out.append({
            "version": version,
            "aliases": sorted(by_version.get(version, [])),
            "created": _iso_utc(mv.creation_timestamp),
            "tags": dict(mv.tags),
        })
    return sorted(out, key=lambda v: -v["version"])


def version_tags(cfg: RegistryConfig, version: int, root: str | Path | None = None) -> dict[str, str]:
    client = _existing_client(cfg, root)
    return dict(client.get_model_version(cfg.model_name, str(version)).tags)


def version_created(cfg: RegistryConfig, version: int, root: str | Path | None = None) -> str:
    """When `version` was registered (ISO 8601, UTC): a fixed fact of that version, so files
    that record it stay byte-identical when they are rebuilt."""
    return _iso_utc(_existing_client(cfg, root).get_model_version(cfg.model_name, str(version)).creation_timestamp)


def _iso_utc(ms: int | str) -> str:
    """An MLflow timestamp (milliseconds) as ISO 8601 UTC, to the second."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat(timespec="seconds")


def _expect(name: str, current: int | None, expected: int | None, what: str) -> None:
    if expected is not UNSET and current != expected:
        raise RegistryError(
            f"{name}: @{CHAMPION} is {_champion_name(current)}, not {_champion_name(expected)} as expected; another "
            f"promotion or rollback moved it. Nothing was changed: see where it points now (the MLflow UI's model page, or "
            f"the studio's registry view), then {what} again if still wanted"
        )


def rollback(
    cfg: RegistryConfig,
    root: str | Path | None = None,
    reason: str = "manual rollback",
    *,
    expected_champion: int | None = UNSET,
) -> dict[str, Any]:
    """Point `@champion` back at `@previous-champion`; the rolled-back version is tagged.

    `@previous-champion` then moves one step further back (to the champion the restored
    version had replaced, if any), so repeated rollbacks walk the promotion history. The
    aliases are read and moved under :func:`promotion_lock`; with `expected_champion` the
    rollback happens only if `@champion` still is that version (compare-and-set), so two
    people rolling back the same bad version roll back one step, not two.
    """
    name = cfg.model_name
    client = _existing_client(cfg, root)
    with promotion_lock(client, name):
        current = _aliases(client, name)
        champion, previous = current.get(CHAMPION), current.get(PREVIOUS)
        _expect(name, champion, expected_champion, "roll back")
        if previous is None:
            raise NoChampionError(f"model {name!r} has no @{PREVIOUS} to roll back to (aliases: {current or 'none'}).")
        client.set_registered_model_alias(name, CHAMPION, str(previous))
        if champion is not None:
            client.set_model_version_tag(name, str(champion), "rolled_back", "true")
            client.set_model_version_tag(name, str(champion), "rollback_reason", _truncate(reason))
        client.set_model_version_tag(name, str(previous), "restored_by_rollback_from", str(champion))
        older = client.get_model_version(name, str(previous)).tags.get("previous_champion_version")
        if older and older.isdigit() and int(older) != previous:
            client.set_registered_model_alias(name, PREVIOUS, older)
            new_previous: int | None = int(older)
        else:
            client.delete_registered_model_alias(name, PREVIOUS)
            new_previous = None
    if champion is not None:  # outside the lock: may download the version from a server
        if client.get_model_version(name, str(champion)).tags.get("content_hash") in (None, "none"):
            # registered before content hashes: hash its adapters now, so a retrain of the
            # same weights is recognised and not re-promoted over this rollback
            try:
                folder = model_artifacts(resolve(cfg, root=root, version=champion)[1]).get("adapters")
                digest = content_hash(folder) if folder is not None else None
            except (RegistryError, OSError):
                digest = None
            if digest:
                client.set_model_version_tag(name, str(champion), "content_hash", digest)
    log.info("rolled back %s: @champion v%s -> v%s (%s)", name, champion, previous, reason)
    return {
        "model_name": name,
        "rolled_back_from": champion,
        "champion_version": previous,
        "previous_champion_version": new_previous,
        "reason": reason,
    }


def resolve(
    cfg: RegistryConfig,
    alias: str | None = CHAMPION,
    root: str | Path | None = None,
    *,
    model_name: str | None = None,
    version: int | None = None,
) -> tuple[int, Path]:
    """(version, local model folder) of `<model_name>@<alias>` (or of `version`).

    The folder holds `MLmodel` and the artifacts (see :func:`model_artifacts`). With a
    local artifact store it is the store's own folder, nothing is copied; otherwise (a
    tracking server's `mlflow-artifacts:/`, or any remote store) the version is downloaded
    once into :func:`download_dir` and reused (a version's files never change), so repeated
    resolves are cheap and give the same path. Raises :class:`NoChampionError`.
    """
    name = model_name or cfg.model_name
    client = _existing_client(cfg, root)
    if not _registered(client, name):
        raise NoChampionError(f"no model named {name!r} in the MLflow registry yet.")
    try:
        if version is None:
            mv = client.get_model_version_by_alias(name, alias or CHAMPION)
        else:
            mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            what = f"@{alias}" if version is None else f"version {version}"
            raise NoChampionError(f"model {name!r} has no {what} in the MLflow registry.") from None
        raise
    uri = client.get_model_version_download_uri(name, mv.version)
    parsed = urlparse(uri)
    if parsed.scheme == "file" or (parsed.scheme == "" and Path(uri).is_dir()):
        local = Path(unquote(parsed.path) if parsed.scheme else uri)
    else:
        local = _download(name, int(mv.version), uri, download_dir(cfg, root, name, int(mv.version), mv.run_id))
    return int(mv.version), local


def download_dir(cfg: RegistryConfig, root: str | Path | None, name: str, version: int, run_id: str | None) -> Path:
    """Where a version from a remote artifact store is cached:
    `<root>/<registry.artifact_root>/downloads/<host_port>/<model>/v<N>-<run id>` (the run
    id tells apart equal version numbers of two servers that reused a host and port)."""
    parsed = urlparse(cfg.tracking_uri)
    host = f"{parsed.hostname}_{parsed.port}" if parsed.hostname else (parsed.scheme or "local")
    base = Path(root or Path.cwd()).resolve() / cfg.artifact_root / "downloads"
    return base / _tag_key(host) / _tag_key(name) / f"v{version}-{(run_id or 'norun')[:12]}"


def _download(name: str, version: int, uri: str, dest: Path) -> Path:
    """Download `models:/name/version` into `dest` (atomically: a temporary sibling renamed
    into place, so a cut download is never taken for a complete one); reuse a complete one."""
    if (dest / "MLmodel").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp)))
        if not (got / "MLmodel").is_file():  # MLflow gives an empty folder when the files are gone
            raise RegistryError(
                f"{name} v{version}: its artifacts ({uri}) downloaded no MLmodel file; the artifact store has "
                "lost them (check the server's --artifacts-destination), register the candidate again"
            )
        try:
            os.replace(got, dest)
        except OSError:
            if not (dest / "MLmodel").is_file():  # not a concurrent download of the same version
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("downloaded %s v%s (%s) to %s", name, version, uri, dest)
    return dest


def model_artifacts(model_dir: str | Path) -> dict[str, Path]:
    """Artifact name → local path of a pyfunc model folder, read from its `MLmodel` file."""
    model_dir = Path(model_dir)
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise RegistryError(f"{model_dir} is not an MLflow model folder (no MLmodel file)")
    spec = yaml.safe_load(mlmodel.read_text())
    entries = spec.get("flavors", {}).get("python_function", {}).get("artifacts", {}) or {}
    return {key: model_dir / value["path"] for key, value in entries.items()}


# --------------------------------------------------------------------------- promotion by hand


def promote(
    cfg: RegistryConfig,
    version: int,
    root: str | Path | None = None,
    reason: str = "manual promotion",
    *,
    expected_champion: int | None = UNSET,
) -> dict[str, Any]:
    """Move `@champion` to `version` by hand (e.g. a `dvc exp run` candidate, or a dry run's).

    Refuses a version whose gate did not pass (tag `gate` is not `passed`) or that was rolled
    back; the replaced champion becomes `@previous-champion`, as in a gated promotion. The
    aliases are read and moved under :func:`promotion_lock`; with `expected_champion` (None:
    no champion) it refuses unless `@champion` still is that version (compare-and-set).
    """
    name = cfg.model_name
    client = _existing_client(cfg, root)
    if not _registered(client, name):
        raise NoChampionError(f"no model named {name!r} in the MLflow registry yet.")
    try:
        tags = dict(client.get_model_version(name, str(version)).tags)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise NoChampionError(f"model {name!r} has no version {version}.") from None
        raise
    if tags.get("gate") != "passed":
        raise RegistryError(
            f"{name} v{version}: its gate did not pass (gate={tags.get('gate', 'missing')}: "
            f"{tags.get('gate_reasons', '')}); only a version that passed the gate can be promoted"
        )
    if tags.get("rolled_back") == "true":
        raise RegistryError(f"{name} v{version} was rolled back ({tags.get('rollback_reason', '')}); not promoted again")
    if tags.get(REGISTRATION) in ("pending", "abandoned"):
        raise RegistryError(
            f"{name} v{version}: its registration was interrupted ({tags[REGISTRATION]}); rerun `dvc repro register` "
            "to finish it, or promote a completely registered version"
        )
    with promotion_lock(client, name):
        current = _aliases(client, name)
        champion = current.get(CHAMPION)
        previous = current.get(PREVIOUS)
        if champion == version:
            return {"model_name": name, "version": version, "promoted": False, "champion_version": champion,
                    "previous_champion_version": previous, "reasons": [f"v{version} already is @{CHAMPION}"]}
        _expect(name, champion, expected_champion, f"promote v{version}")
        if champion is not None:
            client.set_registered_model_alias(name, PREVIOUS, str(champion))
            client.set_model_version_tag(name, str(champion), "superseded_by", str(version))
            client.set_model_version_tag(name, str(version), "previous_champion_version", str(champion))
            previous = champion
        client.set_registered_model_alias(name, CHAMPION, str(version))
        client.set_model_version_tag(name, str(version), "promoted", "true")
        client.set_model_version_tag(name, str(version), "promoted_by", _truncate(reason))
    log.info("promoted %s v%s to @%s by hand (%s)", name, version, CHAMPION, reason)
    return {"model_name": name, "version": version, "promoted": True, "champion_version": version,
            "previous_champion_version": previous, "reasons": []}


def champion_record(
    cfg: RegistryConfig, root: str | Path | None = None, candidate_hash: str | None = None
) -> dict[str, Any]:
    """The champion a candidate is compared with, as deterministic data (no timestamps), so
    that a file of it changes exactly when that champion does (`reports/champion.json`).

    `{"model_name", "version", "content_hash", "metrics", "adapters"}` of `@champion`
    (version null without one). When `candidate_hash` is the champion's own content — the
    candidate was just promoted — the record is of the champion it replaced: the candidate
    was compared with that one, and re-validating it against itself would change nothing.
    """
    empty = {"model_name": cfg.model_name, "version": None, "content_hash": None, "metrics": {}, "adapters": None}
    if not _store_exists(cfg, root):
        return empty
    client = _client(cfg, root)
    if not _registered(client, cfg.model_name):
        return empty
    version, tags = _walk_champion(client, cfg.model_name, _aliases(client, cfg.model_name).get(CHAMPION), candidate_hash)
    if version is None:
        return empty
    digest = tags.get("content_hash")
    metrics = {}
    for key in [k for k in tags.get("metric_keys", "").split(",") if k]:
        try:
            metrics[key] = float(tags[key])
        except (KeyError, ValueError):
            continue
    adapters = None
    try:
        _, model_dir = resolve(cfg, root=root, version=version)
        folder = model_artifacts(model_dir).get("adapters")
        if folder is not None and folder.is_dir():
            adapters = str(folder)
            if not digest or digest == "none":
                digest = content_hash(folder)
    except (RegistryError, OSError) as exc:
        log.warning("champion v%s: adapters not readable (%s)", version, exc)
    return {
        "model_name": cfg.model_name,
        "version": version,
        "content_hash": digest if digest and digest != "none" else None,
        "metrics": dict(sorted(metrics.items())),
        "adapters": adapters,
    }
