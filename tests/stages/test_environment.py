"""Stage `environment`: writes the device probe."""

from __future__ import annotations

import json


def test_environment_stage_writes_probe(tmp_path):
    from stages import environment as stage

    out = tmp_path / "env" / "environment.json"
    stage.main(["--params", "params.yaml", "--out", str(out)])
    assert json.loads(out.read_text())["device"] in ("cpu", "cuda", "mps")
