"""Resumable training: periodic checkpoints of a LoRA run, keyed by a fingerprint of its inputs.

A checkpoint is a folder `<root>/<style>/<fingerprint>/step-<n>/` holding everything that
decides the rest of the run, so that a run stopped at step n and resumed ends with the same
adapter as one that never stopped:

- `lora.safetensors` — the trainable (LoRA) parameters by module name;
- `optimizer.pt` — the optimizer state (and the fp16 loss scaler's, when there is one);
- `rng.safetensors` — the states of the training loop's generators and torch's global RNG;
- `state.json` — the step, the loss history, the fingerprint and run facts that are not in
  the config (`meta`, e.g. the batch size `batch_size: auto` resolved to), written last.

Each folder is published with one rename (:func:`stunning.io.atomic_dir`), so a crash while
writing never leaves a checkpoint that looks complete. The fingerprint hashes the training
config, the base model folder and the style's manifest rows and image bytes: a change to any
of them starts a fresh run instead of resuming from a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stunning.io import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)

# Bump when the checkpoint layout or the training loop's use of randomness changes, so old
# checkpoints are never resumed by code that would continue them differently.
FORMAT_VERSION = 1
# Files up to this size are content-hashed for the fingerprint; larger ones (multi-GB base
# weights) by size and three sampled 4 MiB blocks: fast, machine-independent, and still
# catches a replaced file.
HASH_LIMIT_BYTES = 256 * 1024 * 1024
SAMPLE_BYTES = 4 * 1024 * 1024
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FILES = ("lora.safetensors", "optimizer.pt", "rng.safetensors", "state.json")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sampled_digest(path: Path, size: int) -> str:
    """A hash of `SAMPLE_BYTES` at the start, middle and end of a large file: fast, and the
    same on every machine (a modification time is not: a base model pulled or copied to
    another machine would fingerprint differently there, and a checkpoint carried from a
    worker, `stunning.shared_checkpoints`, would never resume)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for offset in (0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)):
            fh.seek(offset)
            h.update(fh.read(SAMPLE_BYTES))
    return "sampled:" + h.hexdigest()


def _tree_entries(root: Path) -> list[list[str | int]]:
    """(relative path, size, content hash or mtime) for every file under `root`, sorted."""
    entries: list[list[str | int]] = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        st = p.stat()
        ident = _file_digest(p) if st.st_size <= HASH_LIMIT_BYTES else _sampled_digest(p, st.st_size)
        entries.append([p.relative_to(root).as_posix(), st.st_size, ident])
    return entries


def fingerprint(
    train_config: Mapping[str, Any],
    base_path: Path,
    manifest_rows: Iterable[Mapping[str, str]],
    image_root: Path,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A short hash of everything a checkpoint depends on.

    `train_config` is the resolved training config, `manifest_rows` the rows of one style
    (all splits: the validation loss depends on them too); each row's image is hashed from
    `image_root / row["path"]`. `extra` holds anything else that shapes the run (the family,
    the style).
    """
    rows = sorted((dict(r) for r in manifest_rows), key=lambda r: r.get("id", ""))
    images = []
    for r in rows:
        p = Path(image_root) / r["path"]
        images.append(_file_digest(p) if p.is_file() else None)
    payload = {
        "format": FORMAT_VERSION,
        "train": dict(train_config),
        "base": _tree_entries(Path(base_path)),
        "rows": rows,
        "images": images,
        "extra": dict(extra or {}),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    step: int
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    loss_history: list[float] = field(default_factory=list)
    fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"batch_size": 8}


class CheckpointStore:
    """The checkpoints of one (style, fingerprint): save, find the newest valid one, prune."""

    def __init__(self, root: Path, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    @classmethod
    def for_run(cls, checkpoint_dir: Path, style: str, fp: str, keep: int) -> CheckpointStore:
        return cls(Path(checkpoint_dir) / style / fp, keep)

    @property
    def fingerprint(self) -> str:
        return self.root.name

    def steps(self) -> list[tuple[int, Path]]:
        """(step, folder) of every published checkpoint folder, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(
        self,
        step: int,
        lora: Mapping[str, torch.Tensor],
        optimizer: Mapping[str, Any],
        rng: Mapping[str, torch.Tensor],
        loss_history: list[float],
        meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write `step-<step>/` atomically, then prune to the newest `keep`.

        `meta` (JSON-serialisable) holds what the resumed run must reuse that the config does
        not fix, e.g. the batch size `batch_size: auto` resolved to.
        """
        target = self.root / f"step-{step}"
        with atomic_dir(target) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in lora.items()}, tmp / "lora.safetensors")
            torch.save(dict(optimizer), tmp / "optimizer.pt")
            save_file({k: v.to("cpu").contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
            # state.json last: a folder without it is never taken for a checkpoint.
            atomic_write_text(
                tmp / "state.json",
                json.dumps(
                    {
                        "format": FORMAT_VERSION,
                        "step": step,
                        "fingerprint": self.fingerprint,
                        "loss_history": [float(x) for x in loss_history],
                        "meta": dict(meta or {}),
                    }
                ),
            )
        log.info("checkpoint saved: %s", target)
        self.prune()
        return target

    def prune(self) -> list[Path]:
        """Delete all but the newest `keep` checkpoints; return what was deleted."""
        removed = []
        for _, p in self.steps()[: -self.keep]:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        return removed

    def load(self, path: Path) -> Checkpoint:
        from stunning.checks import check_checkpoint

        path = Path(path)
        check_checkpoint(path)  # headers, byte ranges, finite LoRA weights: a CheckpointError (ValueError) names the fault
        missing = [f for f in _FILES if not (path / f).is_file()]
        if missing:
            raise ValueError(f"{path}: incomplete checkpoint (missing {missing})")
        state = json.loads((path / "state.json").read_text())
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: checkpoint format {state.get('format')} != {FORMAT_VERSION}")
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{path}: fingerprint {state.get('fingerprint')} != {self.fingerprint}")
        history = [float(x) for x in state["loss_history"]]
        step = int(state["step"])
        if len(history) != step:
            raise ValueError(f"{path}: loss history has {len(history)} entries for step {step}")
        return Checkpoint(
            path=path,
            step=step,
            lora=load_file(path / "lora.safetensors"),
            # weights_only: the optimizer state is tensors and plain numbers, never code.
            optimizer=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
            rng=load_file(path / "rng.safetensors"),
            loss_history=history,
            fingerprint=self.fingerprint,
            meta=dict(state.get("meta") or {}),
        )

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that loads cleanly; broken ones are skipped with a warning."""
        for _, p in reversed(self.steps()):
            try:
                return self.load(p)
            except Exception as exc:  # noqa: BLE001 -- any unreadable checkpoint is skipped, never fatal
                log.warning("skipping checkpoint %s: %s", p, exc)
        return None
