"""The stage scaffold: every path is required (dvc.yaml passes them), user errors exit 2 cleanly."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages._scaffold import parser, run_stage
from stunning.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def dvc_argv(name: str) -> list[str]:
    """The arguments dvc.yaml passes to stage `name` (`${...}` replaced by a placeholder)."""
    cmd = re.sub(r"\$\{[^}]+\}", "PLACEHOLDER", " ".join(STAGES[name]["cmd"].split()))
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", f"stages.{name}"], cmd
    return argv[3:]


# Paths dvc.yaml passes that a stage run by hand (or a library caller) may leave out, each with
# the documented behaviour without it. Every other path is required.
OPTIONAL = {
    ("train", "--research"): "base_precision auto without a plan: mixed_precision's weight type",
    ("merge", "--data"): "no style sets: the ladder measures the fused model only",
    ("merge", "--research"): "only merge.target_device: plan needs it (a clear error then)",
    ("merge", "--quantize-report"): "written next to --report",
    ("merge", "--quantize-md"): "not written",
    ("merge", "--grid"): "not written",
    ("merge", "--plot-csv"): "not written",
    ("validate", "--quantize-report"): "the gate reports the quantization choice as not evaluated",
    ("register", "--champion"): "the champion the gate report names (candidate.champion_source)",
    ("handoff", "--export"): "a bundle without deployment exports",
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_path_dvc_passes_is_required(name, capsys, monkeypatch):
    stage = importlib.import_module(f"stages.{name}")
    argv = dvc_argv(name)
    flags = [a for a in argv if a.startswith("--")]
    assert "--params" in flags and len(flags) >= 2
    # the stage's parser takes dvc.yaml's command line as it is (parsed only, nothing run)
    parsed = []
    monkeypatch.setattr(stage, "run_stage", lambda _name, ap, av, **kw: parsed.append(ap.parse_args(av)))
    stage.main(argv)
    assert len(parsed) == 1
    monkeypatch.undo()
    for flag in flags:
        if (name, flag) in OPTIONAL:
            continue
        i = argv.index(flag)
        with pytest.raises(SystemExit) as exc:
            stage.main(argv[:i] + argv[i + 2 :])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "the following arguments are required" in err and flag in err, err


def test_stage_without_a_path_argument_exits_2_naming_it(tmp_path, capsys):
    from stages import sample_data

    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    with pytest.raises(SystemExit) as exc:
        sample_data.main(["--params", str(params)])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_user_error_exits_2_with_the_message_and_no_traceback(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"styles": ["impressionist", "noir", "cubism"]}}))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.sample_data", "--params", str(params), "--out", str(tmp_path / "sample")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("sample_data: ") and "cubism" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "sample").exists()


class StageTrouble(ValueError):
    pass


def test_run_stage_loads_params_runs_and_prints_the_summary(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"sample_seed": 7}}))
    out = run_stage(
        "demo",
        parser("demo stage", "--out"),
        ["--params", str(params), "--out", str(tmp_path / "o")],
        run=lambda p, a: {"seed": p.data.sample_seed, "out": a.out},
        summary=lambda s, a: print(f"demo: seed {s['seed']} -> {a.out}"),
    )
    assert out == {"seed": 7, "out": tmp_path / "o"}
    assert capsys.readouterr().out == f"demo: seed 7 -> {tmp_path / 'o'}\n"


@pytest.mark.parametrize("error", [ConfigError("bad key x"), StageTrouble("bad input y")])
def test_run_stage_turns_user_errors_into_exit_2(tmp_path, capsys, error):
    def boom(params, args):
        raise error

    with pytest.raises(SystemExit) as exc:
        run_stage(
            "demo", parser(None, "--out"), ["--params", "nowhere.yaml", "--out", "o"],
            run=boom, summary=lambda s, a: print("not reached"), errors=lambda: (StageTrouble,), params=False,
        )
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == f"demo: {error}\n" and captured.out == ""


def test_run_stage_keeps_the_traceback_of_a_bug(tmp_path):
    def bug(params, args):
        raise KeyError("a bug, not a user error")

    with pytest.raises(KeyError):
        run_stage("demo", parser(None), ["--params", "x"], run=bug, summary=print, errors=(StageTrouble,), params=False)


def test_missing_params_file_is_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_stage("demo", parser(None), ["--params", str(tmp_path / "none.yaml")], run=print, summary=print)
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith(f"demo: {tmp_path / 'none.yaml'}: not found")
