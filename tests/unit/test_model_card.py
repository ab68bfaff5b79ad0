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


EXPORT_REPORT = {
    "family": "sd3", "resolution": 32, "batch": 1,
    "artifacts": [
        {"path": "coreml/denoiser-4bit.mlpackage", "format": "coreml", "component": "denoiser", "variant": "4bit",
         "bits": 4, "bytes": 2_000_000, "fidelity": {"weight_rel_rms_error_mean": 0.0712,
                                                      "weight_rel_rms_error_max": 0.2, "graph_max_abs_error": 1e-6}},
        {"path": "onnx/denoiser.onnx", "format": "onnx", "component": "denoiser", "variant": "float32", "bits": 32,
         "bytes": 15_100_000, "fidelity": {"max_abs_error": 3.1e-6, "psnr_db_min": None, "identical_images": 2}},
        {"path": "swift", "format": "swift-package", "component": "app", "bits": None, "bytes": 40_000,
         "fidelity": {"compiled": False, "sampler_max_abs_error": 2e-7}},
    ],
    "swift": {"reason": "The Swift template is not compiled or run by the pipeline: no toolchain."},
    "not_covered": {"flux": "FLUX is not covered by the deployment export: T5."},
}
QUANTIZE_REPORT = {
    "mode": "auto", "ladder": ["int8", "int4"],
    "target": {"name": "apple-8gb", "memory_budget_mb": 8192.0, "source": "reports/research.json"},
    "budgets": {"min_psnr": 25.0, "max_style_gain_loss": 0.1},
    "levels": [
        {"level": "int8", "runs": True, "backend": "optimum-quanto", "reason": None, "denoiser_bytes": 4_000_000,
         "size_ratio": 0.27, "variants": {"half-half": {"kind": "fused", "psnr": 38.5, "peak_memory_mb": 300.0}},
         "passes": True, "failures": []},
        {"level": "nf4", "runs": False, "backend": "bitsandbytes", "reason": "needs CUDA", "denoiser_bytes": None,
         "size_ratio": None, "variants": {}, "passes": False, "failures": []},
    ],
    "chosen": "int8", "why": "int8 is the smallest level that passes.",
}


def test_deployment_exports_and_quantization_ladder_sections(tmp_path):
    import json

    reports, grid = write_model_card_reports(tmp_path)
    (reports / "export.json").write_text(json.dumps(EXPORT_REPORT))
    (reports / "quantize.json").write_text(json.dumps(QUANTIZE_REPORT))
    build_model_card(Params(), reports, grid, tmp_path / "card")
    _, body = split_front_matter((tmp_path / "card" / "README.md").read_text())
    exports = body.split("## Deployment exports")[1].split("\n## ")[0]
    assert "| `export/coreml/denoiser-4bit.mlpackage` | denoiser | coreml | 4 | 2.00 MB |" in exports
    assert "rel. RMS error 0.0712 mean" in exports
    assert "| `export/onnx/denoiser.onnx` | denoiser | onnx | 32 | 15.10 MB | max abs error 3.1e-06" in exports
    assert "identical images" in exports and "not compiled here" in exports
    assert "Core ML predicts only on Apple platforms" in exports and "cannot be compiled here" in exports
    assert "FLUX is not covered" in exports
    ladder = body.split("## Quantization ladder")[1].split("\n## ")[0]
    assert "| int8 | optimum-quanto | 4.00 MB | 0.27 | 38.5 | 300 | passes |" in ladder
    assert "cannot run here: needs CUDA" in ladder and "Chosen: **int8**. int8 is the smallest" in ladder


def test_without_export_and_quantize_reports_the_ladder_is_omitted_and_exports_say_not_available(tmp_path):
    reports, grid = write_model_card_reports(tmp_path)
    for name in ("export.json", "quantize.json"):
        (reports / name).unlink(missing_ok=True)
    build_model_card(Params(), reports, grid, tmp_path / "card")
    text = (tmp_path / "card" / "README.md").read_text()
    assert "## Quantization ladder" not in text
    assert "## Deployment exports" in text and "Export report not available" in text
