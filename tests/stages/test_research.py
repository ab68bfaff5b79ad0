"""Stage `research`: the sizing report as JSON and Markdown, exit 2 on a missing candidate."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.factories import make_config_only_sd_folder


def test_research_stage_writes_json_and_markdown(tmp_path, capsys):
    from stages import research as stage

    folder = make_config_only_sd_folder(tmp_path / "model")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        yaml.safe_dump(
            {
                "base": {"source": "local", "path": str(folder)},
                "research": {
                    "candidates": [{"name": "mine", "path": str(folder)}],
                    "memory_budget_gb": 4,
                },
            }
        )
    )
    out_json, out_md = tmp_path / "r" / "research.json", tmp_path / "r" / "research.md"
    stage.main(["--params", str(params_file), "--out-json", str(out_json), "--out-md", str(out_md)])
    report = json.loads(out_json.read_text())
    assert report["budget_gb"] == 4 and report["budget_source"] == "params research.memory_budget_gb"
    assert report["plan"]["candidate"] == "mine"
    md = out_md.read_text()
    assert "| mine |" in md and "| Candidate | Params | Precision |" in md
    assert "plan:" in capsys.readouterr().out


def test_research_stage_bad_candidate_exits_2(tmp_path, capsys):
    from stages import research as stage

    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        yaml.safe_dump(
            {
                "base": {"source": "local", "path": str(tmp_path / "missing")},
                "research": {"candidates": [{"name": "gone", "path": str(tmp_path / "missing")}]},
            }
        )
    )
    with pytest.raises(SystemExit) as exc:
        stage.main(
            ["--params", str(params_file), "--out-json", str(tmp_path / "a.json"), "--out-md", str(tmp_path / "a.md")]
        )
    assert exc.value.code == 2
    assert "research.candidates[gone]" in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists()
