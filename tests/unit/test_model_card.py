"""Model card: YAML front matter Hugging Face can parse, sections from the stage reports."""

from __future__ import annotations

import pytest
import yaml

from stunning.config import Params
from stunning.model_card import base_model_id, build_model_card, render_model_card, split_front_matter
from tests.factories import write_model_card_reports


def test_model_card_front_matter_and_body(tmp_path):
    reports, grid = write_model_card_reports(tmp_path)
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
