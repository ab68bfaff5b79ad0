"""Core ML export of every part: a real conversion and palettization of the tiny sd-unet model
(the sd3 model's parts are converted by the export stage's test, tests/stages/test_export.py).

coremltools converts and compresses on Linux; predicting needs macOS, so that check is skipped
elsewhere with the reason (and the report says so rather than failing).
"""

from __future__ import annotations

import json
import sys

import pytest

from stunning.export import ExportError
from stunning.export.components import FLUX_NOT_COVERED
from stunning.export.coreml import PREDICTION_SKIPPED, REPORT_FILE, export_coreml
from stunning.export.swift import package_io

pytestmark = pytest.mark.slow  # one conversion of four tiny parts + one palettization each


@pytest.fixture(scope="module")
def coreml_export(tiny_sd_unet, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml") / "sd-unet"
    # uniform palettization: seconds per bit width (kmeans takes minutes on a 2-core machine)
    return out, export_coreml(tiny_sd_unet, out, nbits=(4,), mode="uniform")


def test_every_part_is_a_package_with_the_sampler_shapes_under_its_names(coreml_export):
    out, report = coreml_export
    parts = report["components"]
    assert set(parts) == {"denoiser", "vae_decoder", "vae_encoder", "text_encoder"}
    assert json.loads((out / REPORT_FILE).read_text())["components"]["denoiser"]["inputs"] == parts["denoiser"]["inputs"]
    assert [(i["name"], i["shape"], i["dtype"]) for i in parts["denoiser"]["inputs"]] == [
        ("sample", [2, 4, 16, 16], "float32"), ("timestep", [2], "float32"),
        ("encoder_hidden_states", [2, 24, 32], "float32")]
    assert [(i["name"], i["shape"]) for i in parts["vae_decoder"]["inputs"]] == [("latents", [1, 4, 16, 16])]
    assert [(o["name"], o["shape"]) for o in parts["vae_decoder"]["outputs"]] == [("image", [1, 3, 32, 32])]
    assert [(i["name"], i["dtype"]) for i in parts["text_encoder"]["inputs"]] == [("input_ids", "int32")]
    assert [o["name"] for o in parts["text_encoder"]["outputs"]] == ["hidden_states"]  # CLIPTextModel: no pooled
    for name, part in parts.items():  # the package on disk says what the report says
        for variant, p in part["packages"].items():
            io = package_io(out / p["package"])
            assert io["inputs"] == [(i["name"], i["shape"]) for i in part["inputs"]], (name, variant)
            assert io["outputs"] == [(o["name"], o["shape"]) for o in part["outputs"]], (name, variant)


def test_the_exported_graphs_reproduce_the_diffusers_modules(coreml_export):
    _, report = coreml_export
    for name, part in report["components"].items():
        check = part["graph_check"]
        assert check["max_abs_error"] <= 1e-4 * max(1.0, check["reference_max_abs"]), name


def test_palettized_weights_read_back_close_to_the_torch_weights_and_are_smaller(coreml_export):
    _, report = coreml_export
    for name, part in report["components"].items():
        w = part["packages"]
        assert w["float16"]["palettized_layers"] == 0, name
        # most layers are compared; what the converter folded into other constants is counted, not compared
        assert w["float16"]["matched"] > w["float16"]["unmatched"], name
        assert w["float16"]["max_abs_error"] < 1e-2, name  # float16 rounding only
        assert w["4bit"]["palettized_layers"] > 0 and w["4bit"]["bits"] == 4, name
        assert 0 < w["4bit"]["rel_rms_error_mean"] < 0.5, name
        assert w["4bit"]["bytes"] < w["float16"]["bytes"], name
        layers = [v for v in w["4bit"]["layers"].values() if v["palettized"]]
        # read back from the package: a look-up table, far fewer values than elements
        assert all(v["unique_values"] < 64 for v in layers), name


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the report holds a real prediction error instead")
def test_prediction_is_reported_as_skipped_off_macos(coreml_export):
    _, report = coreml_export
    for part in report["components"].values():
        assert part["prediction"] == {"skipped": PREDICTION_SKIPPED.format(platform=sys.platform)}


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS; coremltools on Linux converts only")
def test_prediction_matches_torch_on_macos(coreml_export):
    _, report = coreml_export
    for part in report["components"].values():
        p = part["prediction"]
        assert p["max_abs_error"] < 0.05 * max(1.0, p["reference_max_abs"])


def test_bad_bit_width_and_flux_are_refused_before_any_model_loads(tmp_path, tiny_flux):
    with pytest.raises(ExportError, match="1, 2, 3, 4, 6 or 8 bits"):
        export_coreml(tmp_path, tmp_path / "out", nbits=(5,))
    with pytest.raises(ExportError, match="T5 encoder and a SentencePiece") as exc:
        export_coreml(tiny_flux, tmp_path / "out", nbits=(8,))
    assert str(exc.value) == FLUX_NOT_COVERED and not (tmp_path / "out").exists()
