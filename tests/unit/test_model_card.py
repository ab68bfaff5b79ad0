"""Model card: YAML front matter Hugging Face can parse, sections from the stage reports."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from stunning.config import Params
from stunning.model_card import base_model_id, build_model_card, render_model_card, split_front_matter

TRAIN = {
    "styles": {
        "impressionist": {
            "final_loss": 0.1234,
            "steps": 150,
            "steps_per_s": 3.2,
            "peak_memory_mb": 812.5,
            "mlflow_run_id": "abc123",
        },
        "noir": {
            "final_loss": 0.0987,
            "steps": 150,
            "steps_per_s": 3.1,
            "peak_memory_mb": 790.0,
            "mlflow_run_id": "def456",
        },
    }
}
VALIDATION = {
    "variants": {
        "base": {"style_distance": {"impressionist": 0.40, "noir": 0.50}, "latency_s": 0.8, "peak_memory_mb": 700.0},
        "impressionist": {"style_distance": {"impressionist": 0.20}, "latency_s": 0.9, "peak_memory_mb": 720.0},
    }
}
GATE = {
    "passed": False,
    "checks": [
        {"name": "latency", "value": 0.9, "threshold": 5.0, "passed": True, "detail": "max over variants"},
        {"name": "style_gain[noir]", "value": 0.01, "threshold": 0.05, "passed": False, "detail": "too weak"},
    ],
    "reasons": ["style_gain[noir] 0.01 < 0.05: the noir adapter barely changes the style"],
    "candidate": {"version": 3},
}
REGISTRY = {
    "model_name": "stunning-style",
    "version": 3,
    "promoted": False,
    "champion_version": 2,
    "previous_champion_version": 1,
}


def _reports(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    for name, data in (("train", TRAIN), ("validation", VALIDATION), ("gate", GATE), ("registry", REGISTRY)):
        (reports / f"{name}.json").write_text(json.dumps(data))
    grid = reports / "validation" / "grid.png"
    grid.parent.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(grid)
    return reports, grid


def test_model_card_front_matter_and_body(tmp_path):
    reports, grid = _reports(tmp_path)
    out = tmp_path / "build" / "model_card"
    summary = build_model_card(Params(), reports, grid, out)
    text = (out / "README.md").read_text()
    meta, body = split_front_matter(text)
    # yaml.safe_load of the raw block, as the Hub does.
    assert yaml.safe_load(text.split("---\n")[1]) == meta
    for key in ("base_model", "library_name", "license", "tags", "pipeline_tag", "instance_prompt", "model-index"):
        assert key in meta, key
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"lora", "text-to-image", "stable-diffusion", "diffusers", "stunning-engine"} <= set(meta["tags"])
    assert meta["styles"] == ["impressionist", "noir"]
    assert meta["blends"] == {"half-half": {"impressionist": 0.5, "noir": 0.5}}
    metrics = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["impressionist style_distance.impressionist"] == pytest.approx(0.20)
    assert metrics["base latency_s"] == pytest.approx(0.8)
    assert meta["gate_passed"] is False and meta["version"] == "3"

    assert 'pipe.load_lora_weights("adapters/impressionist"' in body
    assert "set_adapters(['impressionist', 'noir'], adapter_weights=[0.5, 0.5])" in body
    assert "**FAILED**" in body and "the noir adapter barely changes the style" in body
    assert "abc123" in body and "0.1234" in body  # training table
    assert "![validation grid](grid.png)" in body
    assert "micro model (SD3 layout, 32 px)" in body  # embedded base: say so
    assert (out / "grid.png").read_bytes() == grid.read_bytes()
    assert summary["missing_reports"] == [] and summary["gate_passed"] is False


def test_model_card_without_reports_still_renders(tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "gate.json").write_text("{not json")
    out = tmp_path / "card"
    summary = build_model_card(Params(), tmp_path / "reports", tmp_path / "no-grid.png", out)
    meta, body = split_front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "diffusers"
    assert meta["model-index"][0]["results"][0]["metrics"] == []
    assert "Gate verdict not available" in body and "Training report not available" in body
    assert "widget" not in meta and not (out / "grid.png").exists()
    assert set(summary["missing_reports"]) == {"train", "validation", "gate", "registry"}


def test_base_model_id_from_hf_cache_path():
    params = Params.model_validate(
        {
            "base": {
                "source": "local",
                "path": "/home/u/.cache/huggingface/hub/models--runwayml--stable-diffusion-v1-5/snapshots/abc",
            }
        }
    )
    assert base_model_id(params) == "runwayml/stable-diffusion-v1-5"
    card = render_model_card(params, {})
    assert split_front_matter(card)[0]["base_model"] == "runwayml/stable-diffusion-v1-5"
    assert "micro model" not in card


def test_docs_stage(tmp_path, capsys):
    from stages import docs

    reports, grid = _reports(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("{}\n")
    out = tmp_path / "build" / "model_card"
    docs.main(["--params", str(params_file), "--reports", str(reports), "--grid", str(grid), "--out", str(out)])
    assert (out / "README.md").is_file() and (out / "grid.png").is_file()
    assert "gate FAILED" in capsys.readouterr().out
