"""Stage `train`: every style trained on the tiny embedded model, its reports, plots, samples,
checkpoints and MLflow runs; exit 2 with the missing file named."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.factories import REPO, STYLES, make_curated


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    return make_curated(tmp_path_factory.mktemp("curated"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params_file(tmp_path: Path, **train) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(train)
    params["registry"]["tracking_uri"] = "sqlite:///mlruns/mlflow.db"
    params["registry"]["artifact_root"] = "mlruns/artifacts"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


# The output paths dvc.yaml passes to the train stage (relative to the test's working folder).
TRAIN_OUTPUTS = [
    "--out", "models/adapters", "--metrics", "reports/train.json", "--plots", "reports/train_loss.csv",
    "--plot-image", "reports/train_loss.png", "--samples", "reports/train_samples", "--checkpoints", "checkpoints",
]


@pytest.mark.slow  # ~7 s, half of it creating the MLflow database
def test_stage_trains_every_style_and_writes_reports(tmp_path, monkeypatch, tiny_base, curated, capsys):
    import mlflow

    from stages import train as stage

    monkeypatch.chdir(tmp_path)
    _params_file(tmp_path, steps=3, batch_size=2, checkpoint_every=2)
    # train.base_precision auto takes the research plan's precision (QLoRA on an int8 base).
    Path("research.json").write_text(json.dumps({"plan": {"precision": "int8", "device": "cpu"}}))
    stage.main(["--params", "params.yaml", "--base", str(tiny_base), "--data", str(curated), *TRAIN_OUTPUTS,
                "--research", "research.json"])

    report = json.loads(Path("reports/train.json").read_text())
    assert set(report["styles"]) == set(STYLES)
    for style, r in report["styles"].items():
        assert {"final_loss", "val_loss", "steps", "steps_per_s", "peak_memory_mb", "mlflow_run_id", "seconds"} <= set(
            r
        )
        assert r["steps"] == 3 and r["final_loss"] > 0 and r["peak_memory_mb"] > 0
        assert r["base_precision"] == "int8"
        assert Path(f"models/adapters/{style}/pytorch_lora_weights.safetensors").is_file()
        assert Path(f"models/adapters/{style}/train_config.yaml").is_file()
        assert len(list(Path(f"reports/train_samples/{style}").glob("*.png"))) == 4
    with open("reports/train_loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["step", *STYLES] and [r["step"] for r in rows] == ["1", "2", "3"]
    # With fewer steps than the smoothing window, the final loss is the mean of the curve.
    noir = [float(r["noir"]) for r in rows]
    assert sum(noir) / 3 == pytest.approx(report["styles"]["noir"]["final_loss"], abs=1e-5)
    assert Image.open("reports/train_loss.png").size[0] > 100
    assert {p.name for p in Path("checkpoints").iterdir()} == {*STYLES, "_encodings"}
    # The styles share the encoding cache: both styles' images and captions are in it.
    assert len(list(Path("checkpoints/_encodings").glob("*/latent/*.pt"))) > 0
    assert "LoRA training" in capsys.readouterr().out

    runs = mlflow.search_runs(experiment_names=["stunning-engine"], output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {f"train-{s}" for s in STYLES}
    for style in STYLES:
        run = by_name[f"train-{style}"]
        assert run.info.run_id == report["styles"][style]["mlflow_run_id"]
        assert run.data.tags["stage"] == "train" and run.data.tags["style"] == style
        assert run.data.params["base_precision"] == "int8" and run.data.params["train.base_precision"] == "auto"
        assert run.info.status == "FINISHED" and "val_loss" in run.data.metrics
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]


def test_stage_bad_input_exits_2_with_the_file_named(tmp_path, monkeypatch, tiny_base, capsys):
    from stages import train as stage

    monkeypatch.chdir(tmp_path)
    _params_file(tmp_path)
    with pytest.raises(SystemExit) as exc:
        stage.main(["--params", "params.yaml", "--base", str(tiny_base), "--data", "nowhere", *TRAIN_OUTPUTS])
    assert exc.value.code == 2
    assert "nowhere/manifest.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        stage.main(["--params", "params.yaml", "--base", "no-such-model", "--data", "nowhere", *TRAIN_OUTPUTS])
    assert "no-such-model" in capsys.readouterr().err
    assert not Path("mlruns").exists()  # nothing recorded for a run that never started


def test_stage_bad_research_plan_exits_2_before_training(tmp_path, monkeypatch, tiny_base, capsys):
    from stages import train as stage
    from tests.factories import make_curated

    monkeypatch.chdir(tmp_path)
    _params_file(tmp_path)
    curated = make_curated(tmp_path / "curated", n_train=2, n_val=0)
    args = ["--params", "params.yaml", "--base", str(tiny_base), "--data", str(curated), *TRAIN_OUTPUTS]
    with pytest.raises(SystemExit) as exc:
        stage.main([*args, "--research", "missing.json"])
    assert exc.value.code == 2 and "--research missing.json: no such file" in capsys.readouterr().err
    Path("research.json").write_text(json.dumps({"plan": {"precision": None, "reason": "needs 40 GB"}}))
    with pytest.raises(SystemExit) as exc:
        stage.main([*args, "--research", "research.json"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "found no precision at which training fits (needs 40 GB)" in err
    assert not Path("mlruns").exists() and not Path("models").exists()
