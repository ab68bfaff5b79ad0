"""flows.fanout: the training fan-out over Prefect workers, and its sequential fallback. The
fan-out end to end (two workers in their own clones, checkpoints carried back through the MLflow
server) runs in tests/integration/test_dvc_remote.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flows.fanout import POOL_ENV, checkpoint_dir, fan_out, plan_training, train_command
from tests.factories import REPO


def test_one_worker_or_one_style_trains_sequentially_in_one_group():
    assert plan_training(["impressionist", "noir"], workers=1) == [["impressionist", "noir"]]
    assert plan_training(["impressionist", "noir"], workers=0) == [["impressionist", "noir"]]
    assert plan_training(["noir"], workers=4) == [["noir"]]
    assert plan_training([], workers=3) == []


def test_several_workers_get_the_styles_round_robin_one_group_each_at_most():
    styles = ["a", "b", "c", "d", "e"]
    assert plan_training(styles, workers=2) == [["a", "c", "e"], ["b", "d"]]
    assert plan_training(["a", "b"], workers=5) == [["a"], ["b"]]
    groups = plan_training(styles, workers=3)
    assert sorted(s for g in groups for s in g) == styles and len(groups) == 3


def test_outside_a_worker_nothing_fans_out_and_no_server_is_asked(monkeypatch, tmp_path):
    monkeypatch.delenv(POOL_ENV, raising=False)
    assert not fan_out(tmp_path)  # tmp_path has no params.yaml: returned before reading anything


def test_the_fanned_out_command_is_the_train_stage_with_its_outputs_moved(tmp_path):
    cmd = train_command(REPO, tmp_path / "params.yaml", tmp_path / "scratch")
    args = dict(zip(cmd[3::2], cmd[4::2], strict=True))
    assert cmd[:3] == [sys.executable, "-m", "stages.train"]
    assert args["--params"] == str(tmp_path / "params.yaml")
    assert args["--data"] == "data/curated" and args["--checkpoints"] == "checkpoints"  # as dvc.yaml wires them
    assert args["--out"] == str(tmp_path / "scratch" / "adapters")
    assert all(Path(args[f]).parent == tmp_path / "scratch" for f in ("--metrics", "--plots", "--samples"))
    assert checkpoint_dir(REPO) == REPO / "checkpoints"  # where carried checkpoints go


def test_a_group_params_file_validates_with_only_its_styles(tmp_path):
    import yaml

    from flows.fanout import group_params
    from stunning.config import load_params

    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(group_params(shipped, ["noir"])))
    params = load_params(path)
    assert params.data.styles == ["noir"] and params.train == load_params(REPO / "params.yaml").train
    with pytest.raises(ValueError, match="must be some of params.yaml data.styles"):
        group_params(shipped, ["cubist"])


def test_a_fanned_out_style_the_train_stage_trained_again_is_named(tmp_path):
    import json

    from flows.phases import retrained_here

    report = tmp_path / "train.json"
    report.write_text(json.dumps({"styles": {
        "noir": {"steps": 30, "resumed_from_step": 30},  # resumed from the worker's checkpoint
        "impressionist": {"steps": 30, "resumed_from_step": 0},  # its checkpoint did not match
        "cubist": {"steps": 30, "resumed_from_step": 0},  # not fanned out: trained here as planned
    }}))
    lines = retrained_here(report, [["noir"], ["impressionist"]])
    assert len(lines) == 1 and lines[0].startswith("WARNING: impressionist was trained again here")
    assert "fingerprint" in lines[0]
    assert retrained_here(tmp_path / "missing.json", [["noir"]]) == []


def test_a_worker_reproduces_every_stage_the_train_stage_reads_from():
    """A bare clone has no research report, curated data or base model: the fanned-out run
    reproduces the stages that make them (from dvc.yaml), never the train stage itself."""
    from flows.fanout import upstream_of_train

    upstream = upstream_of_train(REPO)
    assert {"research", "curate", "base_model"} <= set(upstream) and "train" not in upstream
