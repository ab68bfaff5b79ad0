"""`stunning blends`: save, list, promote into params.yaml (the pipeline then builds it), delete."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from typer.testing import CliRunner

from stunning.cli import app
from stunning.config import load_params

REPO = Path(__file__).resolve().parents[2]


def test_save_list_promote_delete(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copyfile(REPO / "params.yaml", params)
    run = CliRunner().invoke
    saved = run(app, ["blends", "save", "mostly-noir", "--style", "noir=0.8", "--style", "impressionist=0.2",
                      "--negative", "a blue hat", "--params", str(params)])
    assert saved.exit_code == 0, saved.output
    assert yaml.safe_load((tmp_path / "studio/blends/mostly-noir.yaml").read_text()) == {
        "name": "mostly-noir", "weights": {"noir": 0.8, "impressionist": 0.2}, "negative_prompt": "a blue hat"}
    listed = run(app, ["blends", "list", "--params", str(params)])
    assert "mostly-noir" in listed.output and "noir=0.8" in listed.output
    promoted = run(app, ["blends", "promote", "mostly-noir", "--params", str(params)])
    assert promoted.exit_code == 0, promoted.output
    blends = {b.name: b.weights for b in load_params(params).merge.blends}
    assert blends["mostly-noir"] == {"noir": 0.8, "impressionist": 0.2} and "half-half" in blends
    bad = run(app, ["blends", "save", "x", "--style", "noir=lots", "--params", str(params)])
    assert bad.exit_code == 2 and "not a number" in bad.output
    assert run(app, ["blends", "delete", "mostly-noir", "--params", str(params)]).exit_code == 0
    missing = run(app, ["blends", "delete", "mostly-noir", "--params", str(params)])
    assert missing.exit_code == 2 and "no saved blend" in missing.output
