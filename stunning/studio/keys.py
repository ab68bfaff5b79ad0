"""API keys for the studio server: create, list, revoke, verify; only hashes are stored.

A key is 32 random bytes (``secrets.token_urlsafe``) behind a ``stn_`` prefix, shown once when
created. The store keeps its SHA-256, never the key. A salted slow hash (scrypt, bcrypt) is
for passwords, which are short and guessable; a 256-bit random token cannot be brute-forced
from its hash, and a fast hash lets the server check a key on every request with one dict
lookup instead of ~50 ms of scrypt per request.

The store is one JSON file (default ``<project>/studio/keys.json``), written atomically
(temp file + rename) with mode 0600 in a 0700 folder, and every read-modify-write holds an
advisory lock on a sibling ``.lock`` file, so `stunning keys create` can run while a server
updates last-used times. A running server re-reads the file when it changes, so a revoked
key stops working within one request; last-used times are written back at most once a
minute per key (a write per request would make the file the bottleneck).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KEY_PREFIX = "stn_"
DEFAULT_KEYS_FILE = Path("studio") / "keys.json"  # relative to the project root
LAST_USED_FLUSH_S = 60.0  # how stale a stored last-used time may get
FORMAT_VERSION = 1


class KeyStoreError(ValueError):
    """The key file cannot be read or a key id is unknown; the message says what to do."""


@dataclass(frozen=True)
class ApiKey:
    """One stored key: never the key itself, only its hash."""

    id: str
    name: str
    created: str  # ISO 8601, UTC
    sha256: str
    last_used: str | None = None

    def public(self) -> dict[str, Any]:
        """What `stunning keys list` shows: everything but the hash."""
        return {"id": self.id, "name": self.name, "created": self.created, "last_used": self.last_used}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def default_keys_path(root: str | Path | None) -> Path:
    return Path(root or Path.cwd()) / DEFAULT_KEYS_FILE


class KeyStore:
    """The key file at `path`; thread-safe, and safe beside other processes using the same file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._by_hash: dict[str, ApiKey] = {}
        self._stamp: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) of what _by_hash holds
        self._used: dict[str, float] = {}  # key id -> last use (epoch s) not yet written
        self._flushed: dict[str, float] = {}  # key id -> when its last use was last written

    # ------------------------------------------------------------------ file
    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                import fcntl
            except ImportError:  # Windows: no advisory locks; one writer at a time is then on the user
                yield
                return
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _read(self) -> list[ApiKey]:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise KeyStoreError(f"{self.path}: the API key file cannot be read ({exc})") from None
        try:
            doc = json.loads(raw)
            return [ApiKey(**{k: item.get(k) for k in ("id", "name", "created", "sha256", "last_used")})
                    for item in doc["keys"]]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyStoreError(
                f"{self.path}: the API key file is not valid ({type(exc).__name__}: {exc}); fix it or move it "
                "away and create new keys with `stunning keys create`"
            ) from None

    def _write(self, keys: list[ApiKey]) -> None:
        data = json.dumps({"version": FORMAT_VERSION, "keys": [asdict(k) for k in keys]}, indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")  # mode 0600
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _refresh(self) -> None:
        """Re-read the file when it changed since the last read (call under self._lock)."""
        stamp = self._file_stamp()
        if stamp != self._stamp or stamp is None:
            self._by_hash = {k.sha256: k for k in self._read()}
            self._stamp = stamp

    # ------------------------------------------------------------------ commands
    def create(self, name: str = "") -> tuple[ApiKey, str]:
        """A new key: (its record, the key itself — shown to the user once, stored nowhere)."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._lock, self._file_lock():
            keys = self._read()
            taken = {k.id for k in keys}
            key_id = secrets.token_hex(4)
            while key_id in taken:
                key_id = secrets.token_hex(4)
            record = ApiKey(id=key_id, name=name, created=_now(), sha256=hash_key(key))
            self._write([*keys, record])
        log.info("created API key %s (%s)", record.id, name or "no name")
        return record, key

    def list(self) -> list[ApiKey]:
        with self._lock:
            self._flush_locked(force=True)
            return self._read()

    def revoke(self, key_id: str) -> ApiKey:
        with self._lock, self._file_lock():
            keys = self._read()
            found = next((k for k in keys if k.id == key_id), None)
            if found is None:
                listed = ", ".join(k.id for k in keys) or "none"
                raise KeyStoreError(f"no API key with id {key_id!r} in {self.path} (ids: {listed}); see `stunning keys list`")
            self._write([k for k in keys if k.id != key_id])
            self._used.pop(key_id, None)
        log.info("revoked API key %s (%s)", found.id, found.name or "no name")
        return found

    def count(self) -> int:
        with self._lock:
            self._refresh()
            return len(self._by_hash)

    # ------------------------------------------------------------------ serving
    def verify(self, key: str | None) -> ApiKey | None:
        """The record of `key`, or None when it is missing, unknown or revoked. Records the use."""
        if not key:
            return None
        digest = hash_key(key)
        with self._lock:
            self._refresh()
            found = self._by_hash.get(digest)
            if found is None or not hmac.compare_digest(found.sha256, digest):
                return None
            now = time.time()
            self._used[found.id] = now
            if now - self._flushed.get(found.id, 0.0) >= LAST_USED_FLUSH_S:
                self._flush_locked()
            return found

    def flush(self) -> None:
        """Write pending last-used times now (a server calls this when it stops)."""
        with self._lock:
            self._flush_locked(force=True)

    def _flush_locked(self, force: bool = False) -> None:
        if not self._used:
            return
        now = time.time()
        due = {k: t for k, t in self._used.items() if force or now - self._flushed.get(k, 0.0) >= LAST_USED_FLUSH_S}
        if not due:
            return
        try:
            with self._file_lock():
                keys = self._read()
                stamp = lambda t: datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")  # noqa: E731
                updated = [
                    ApiKey(**{**asdict(k), "last_used": stamp(due[k.id])}) if k.id in due else k for k in keys
                ]
                self._write(updated)
        except (OSError, KeyStoreError) as exc:  # a read-only project still serves; the times wait
            log.warning("could not record API key use in %s: %s", self.path, exc)
            return
        for k in due:
            self._used.pop(k, None)
            self._flushed[k] = now
        self._stamp = None  # our own write: re-read next time
