"""API keys (hashed, private file, revocation seen by a running server) and the rate limiter."""

from __future__ import annotations

import json
import stat

import pytest

from stunning.studio.keys import KEY_PREFIX, KeyStore, KeyStoreError, hash_key
from stunning.studio.ratelimit import RateLimiter


def test_a_key_is_shown_once_and_stored_only_as_a_hash_in_a_private_file(tmp_path):
    store = KeyStore(tmp_path / "studio/keys.json")
    record, key = store.create("alice's laptop")
    assert key.startswith(KEY_PREFIX) and len(key) > 40
    text = store.path.read_text()
    assert key not in text and hash_key(key) in text
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    listed = [k.public() for k in store.list()]
    assert listed == [{"id": record.id, "name": "alice's laptop", "created": record.created, "last_used": None}]
    assert store.verify(key).id == record.id
    assert store.verify(key + "x") is None and store.verify("") is None and store.verify(None) is None
    assert not list(tmp_path.glob("studio/.keys.json.*.tmp"))  # atomic writes leave no temp files


def test_a_key_revoked_elsewhere_stops_working_at_once(tmp_path):
    server = KeyStore(tmp_path / "keys.json")  # what a running server holds
    cli = KeyStore(tmp_path / "keys.json")  # what `stunning keys ...` uses, meanwhile
    kept, kept_key = cli.create("kept")
    gone, gone_key = cli.create("gone")
    assert server.verify(gone_key).id == gone.id
    assert cli.revoke(gone.id).name == "gone"
    assert server.verify(gone_key) is None and server.verify(kept_key).id == kept.id
    with pytest.raises(KeyStoreError, match=f"no API key with id 'nope'.*{kept.id}"):
        cli.revoke("nope")


def test_last_use_is_recorded_without_a_write_per_request(tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    record, key = store.create()
    store.verify(key)  # first use: written at once
    first = json.loads(store.path.read_text())["keys"][0]["last_used"]
    assert first is not None
    stamp = store.path.stat().st_mtime_ns
    for _ in range(20):
        store.verify(key)
    assert store.path.stat().st_mtime_ns == stamp  # within the minute: not written again
    store.flush()
    assert KeyStore(store.path).list()[0].last_used is not None


def test_a_damaged_key_file_is_a_clear_error(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    with pytest.raises(KeyStoreError, match="keys.json: the API key file is not valid.*stunning keys create"):
        KeyStore(path).verify("stn_whatever")


def test_the_rate_limiter_allows_a_burst_then_the_rate_and_says_when_to_retry():
    now = [0.0]
    limiter = RateLimiter(per_minute=6, burst=2, clock=lambda: now[0])  # one request every 10 s
    assert [limiter.acquire("a") for _ in range(2)] == [0, 0]
    assert limiter.acquire("a") == 10  # empty bucket: a token in 10 s
    assert limiter.acquire("b") == 0  # buckets are per client
    now[0] = 4.0
    assert limiter.acquire("a") == 6
    now[0] = 10.0
    assert limiter.acquire("a") == 0 and limiter.acquire("a") == 10
    now[0] = 1000.0  # a long pause refills only up to the burst
    assert [limiter.acquire("a") for _ in range(3)] == [0, 0, 10]
    assert RateLimiter(per_minute=0, burst=0).acquire("a") == 0  # off
