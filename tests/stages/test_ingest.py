"""Stage `ingest`: the manifest and both reports from a messy raw folder, exit 2 on a missing one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.factories import make_messy_raw


@pytest.fixture()
def raw(tmp_path) -> Path:
    return make_messy_raw(tmp_path)


def test_ingest_stage_main(raw, tmp_path, capsys):
    from stages.ingest import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"raw_dir": str(raw)}}))
    out, rep, md = tmp_path / "ing", tmp_path / "r/ingest.json", tmp_path / "r/ingest.md"
    main(["--params", str(params), "--raw", str(raw), "--out", str(out), "--report", str(rep), "--report-md", str(md)])
    assert json.loads(rep.read_text())["accepted"] == 6 and md.is_file()
    assert "6 accepted, 11 rejected" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", str(params), "--raw", str(tmp_path / "missing"), "--out", str(out),
              "--report", str(rep), "--report-md", str(md)])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err
