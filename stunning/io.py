"""Atomic file writing and small JSON helpers used by every stage.

A stage that crashes must never leave a half-written artefact that a later stage would
trust, so every output goes through a temporary file in the same directory and an
`os.replace`. Directories are published the same way (build in `name.tmp-*`, then rename).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically, pretty-printed with sorted keys so diffs stay readable."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_json_if_present(path: Path | None) -> Any:
    """:func:`read_json` of an optional report: None when no path is given or the file is absent."""
    return read_json(path) if path is not None and Path(path).is_file() else None


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def relocate_text_paths(folder: Path, old: Path, new: Path, suffixes: tuple[str, ...] = (".json", ".yaml")) -> list[Path]:
    """Replace the path `old` by `new` in the small text files under `folder` (atomically each).

    Files written inside an :func:`atomic_dir` that record where they were made (diffusers'
    `_name_or_path`, a fused model's LoRA source) would otherwise name the random temporary
    folder: a rerun would give different bytes (and DVC hashes) for the same model. Returns the
    files changed."""
    changed = []
    old_s, new_s = str(old), str(new)
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix not in suffixes or not path.is_file() or path.stat().st_size > 1 << 20:
            continue
        text = path.read_text()
        if old_s in text:
            atomic_write_text(path, text.replace(old_s, new_s))
            changed.append(path)
    return changed


def canonicalize_safetensors(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys (in place, atomically; the
    tensor bytes are untouched).

    `safetensors` keeps `__metadata__` in a hash map whose order changes from process to
    process, so the same tensors and metadata would give different bytes (and DVC hashes).
    Every safetensors file the project writes goes through this after `save_file`.
    """
    import struct

    path = Path(path)
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        data = fh.read()
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes; the data stays aligned
    tmp = path.with_name(path.name + ".canon.tmp")
    with tmp.open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        fh.write(data)
    os.replace(tmp, path)
