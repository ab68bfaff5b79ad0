"""flows.dvc_runner.repair_state: a DVC rwlock file left corrupt by a kill is moved aside."""

from __future__ import annotations

import json

import pytest

from flows.dvc_runner import repair_state


@pytest.mark.parametrize("damage", [b"", b'{"read": {}, "wri', b"\xff\xfe"])
def test_a_corrupt_rwlock_is_moved_aside(tmp_path, damage):
    tmp = tmp_path / ".dvc" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "rwlock").write_bytes(damage)
    assert "was corrupt" in repair_state(tmp_path)
    assert not (tmp / "rwlock").exists() and (tmp / "rwlock.corrupt").read_bytes() == damage
    assert repair_state(tmp_path) is None  # nothing left to repair


def test_a_valid_or_absent_rwlock_is_left_alone(tmp_path):
    assert repair_state(tmp_path) is None  # no .dvc/tmp at all
    tmp = tmp_path / ".dvc" / "tmp"
    tmp.mkdir(parents=True)
    live = {"read": {}, "write": {"models/adapters": {"pid": 1, "cmd": "dvc repro"}}}
    (tmp / "rwlock").write_text(json.dumps(live))
    assert repair_state(tmp_path) is None
    assert json.loads((tmp / "rwlock").read_text()) == live
