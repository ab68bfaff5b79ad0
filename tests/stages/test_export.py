"""Stage `export` as `make run` runs it: its outputs in the default clone (`dvc repro` of the
shipped params on the micro model, tests/conftest.py): Core ML packages of every part at every
configured bit width, the ONNX denoiser checked with ONNX Runtime, the Swift template and its
resources, the reports. The error paths run the stage on their own inputs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from stunning.export.swift import MANIFEST, missing_resources, package_io, template_dir

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # reads the default clone's export

SHIPPED = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
BITS = SHIPPED["export"]["coreml"]["palettize_bits"]
STEPS = SHIPPED["validate"]["steps"]


@pytest.fixture(scope="module")
def exported(default_dag_project):
    root = default_dag_project
    out, report, md = root / "build" / "export", root / "reports" / "export.json", root / "reports" / "export.md"
    return out, json.loads(report.read_text()), json.loads((out / "export.json").read_text()), md.read_text()


def test_every_part_and_bit_width_is_a_package_listed_with_its_size(exported):
    out, summary, full, _ = exported
    parts = full["coreml"]["components"]
    assert set(parts) == {"denoiser", "vae_decoder", "vae_encoder", "text_encoder", "text_encoder_2"}
    coreml = [a for a in summary["artifacts"] if a["format"] == "coreml"]
    variants = ("float16", *(f"{b}bit" for b in BITS))
    assert {(a["component"], a["variant"]) for a in coreml} == {(p, v) for p in parts for v in variants}
    for a in coreml:
        assert (out / a["path"] / "Manifest.json").is_file()
        assert a["bytes"] == sum(f.stat().st_size for f in (out / a["path"]).rglob("*") if f.is_file())
    den = {a["variant"]: a for a in coreml if a["component"] == "denoiser"}
    assert den["4bit"]["bytes"] < den["8bit"]["bytes"] < den["float16"]["bytes"]
    assert den["8bit"]["fidelity"]["weight_rel_rms_error_mean"] < den["4bit"]["fidelity"]["weight_rel_rms_error_mean"]
    # sd3's parts at the configured 32 px, one image (the denoiser sees two with guidance)
    io = {n: {i["name"]: i["shape"] for i in p["inputs"] + p["outputs"]} for n, p in parts.items()}
    assert io["denoiser"]["hidden_states"] == [2, 4, 16, 16] and io["vae_decoder"]["image"] == [1, 3, 32, 32]
    assert io["text_encoder"] == {"input_ids": [1, 24], "hidden_states": [1, 24, 64], "pooled": [1, 64]}


def test_per_layer_errors_are_in_the_full_report_and_only_summaries_in_the_metrics(exported):
    _, summary, full, md = exported
    for name, part in full["coreml"]["components"].items():
        assert part["graph_check"]["max_abs_error"] <= 1e-4 * max(1.0, part["graph_check"]["reference_max_abs"]), name
        four = part["packages"]["4bit"]
        assert four["palettized_layers"] > 0, name
        # what the converter folded into other constants is counted as unmatched, not compared
        assert four["unmatched"] == 0 if name == "denoiser" else four["matched"] > four["unmatched"], name
        assert all(v["rel_rms_error"] < 1.0 for v in four["layers"].values()), name
        assert "layers" not in summary["coreml"]["components"][name]["packages"]["4bit"]
    assert "| `coreml/denoiser-4bit.mlpackage` | coreml | 4 |" in md and "FLUX" in md


def test_the_onnx_denoiser_matches_torch_within_the_budget(exported):
    out, summary, full, _ = exported
    onnx = full["onnx"]
    assert (out / "onnx" / "denoiser.onnx").is_file() and onnx["max_abs_error"] < 1e-3
    assert onnx["sampling"]["onnx_denoiser_calls"] == STEPS and len(onnx["images"]) >= 1
    assert all(i["psnr_db"] is None or i["psnr_db"] > 40 for i in onnx["images"])
    assert summary["failures"] == [] and "images" not in summary["onnx"]


def test_every_resource_the_swift_app_names_exists_with_the_exported_shapes(exported):
    out, _, full, _ = exported
    swift = out / "swift"
    assert missing_resources(swift) == [] and full["swift"]["compiled"] is False
    manifest = json.loads((swift / MANIFEST).read_text())
    assert manifest["sampler"]["kind"] == "flow-euler" and manifest["steps"] == STEPS
    assert manifest["conditioning"] == {"kind": "sd3", "encoders": ["text_encoder", "text_encoder_2"], "pad_to": 96,
                                        "zero_tokens": 0}
    sources = "\n".join(p.read_text() for p in (swift / "Sources").rglob("*.swift"))
    assert sources == "\n".join(p.read_text() for p in (template_dir() / "Sources").rglob("*.swift"))
    # every model key and feature name the Swift code spells out is in the manifest and the packages
    keys = set(re.findall(r'(?:model|predict)\("([a-z_0-9]+)"', sources))
    assert keys == {"denoiser", "vae_decoder"} and keys <= set(manifest["models"])
    names = {n for m in manifest["models"].values() for p in m["packages"].values()
             for kind in package_io(swift / p).values() for n, _ in kind}
    assert set(re.findall(r'(?:case |\[|for: )"([a-z_]+)"', sources)) - {"float16", "float32"} <= names
    assert {"Package.swift", "README.md", "resources.json"} <= {p.name for p in swift.iterdir()}
    assert "Not compiled here" in (swift / "README.md").read_text() and "{{" not in (swift / "README.md").read_text()


def test_the_swift_sampler_rule_reproduces_the_diffusers_pipeline(exported):
    _, _, full, _ = exported
    check = full["swift"]["sampler_check"]
    assert check["steps"] == STEPS and check["max_abs_error"] < 1e-4 * max(1.0, check["reference_max_abs"])


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predictions need macOS; on Linux coremltools converts only")
def test_core_ml_decoded_image_matches_torch_on_macos(exported, default_dag_project):
    import coremltools as ct
    import numpy as np
    import torch

    from stunning.families import get_family

    out, _, _, _ = exported
    fam = get_family("sd3")
    pipe = fam.load_pipeline(default_dag_project / "models/merged/fused", torch.device("cpu"), torch.float32)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample.numpy()
    for variant in ("vae_decoder.mlpackage", "vae_decoder-8bit.mlpackage"):
        got = ct.models.MLModel(str(out / "coreml" / variant)).predict({"latents": latents.numpy()})["image"]
        mse = float((((got.clip(-1, 1) - ref.clip(-1, 1)) * 127.5) ** 2).mean())
        assert mse == 0 or 10 * np.log10(255.0**2 / mse) > 30, variant


def test_a_missing_fused_model_exits_2_naming_the_stage_to_run(tmp_path, capsys):
    from stages import export

    (tmp_path / "params.yaml").write_text("{}\n")
    with pytest.raises(SystemExit) as exc:
        export.main(["--params", str(tmp_path / "params.yaml"), "--model", str(tmp_path / "fused"),
                     "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.json"),
                     "--report-md", str(tmp_path / "r.md")])
    assert exc.value.code == 2
    assert "dvc repro merge" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_budget_failures_name_the_param_to_change():
    from stunning.config import ExportConfig
    from stunning.export.deploy import budget_failures

    report = {"onnx": {"max_abs_error": 0.5, "psnr_db_min": 12.0},
              "swift": {"missing_resources": ["Resources/x.json: not found"],
                        "sampler_check": {"max_abs_error": 0.0, "reference_max_abs": 1.0}}}
    failures = budget_failures(report, ExportConfig())
    assert any("export.onnx.max_abs_error" in f for f in failures)
    assert any("export.onnx.min_psnr_db" in f for f in failures)
    assert any("Resources/x.json" in f for f in failures)
    assert budget_failures({"onnx": {"max_abs_error": 1e-6, "psnr_db_min": None}}, ExportConfig()) == []


def test_export_config_refuses_bit_widths_core_ml_lacks(tmp_path):
    from stunning.config import ConfigError, load_params

    path = Path(__file__).resolve().parents[2] / "params.yaml"
    assert load_params(path).export.coreml.palettize_bits == [8, 6, 4]
    bad = yaml.safe_load(path.read_text())
    bad["export"]["coreml"]["palettize_bits"] = [5]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="palettize_bits"):
        load_params(tmp_path / "params.yaml")
