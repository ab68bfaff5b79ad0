"""Core ML export of the denoiser: a real conversion and palettization of the tiny sd3 model.

coremltools converts and compresses on Linux; predicting needs macOS, so that check is skipped
elsewhere with the reason (and the report says so rather than failing).
"""

from __future__ import annotations

import json
import sys

import pytest

from stunning.export import ExportError
from stunning.export.coreml import PACKAGE, PREDICTION_SKIPPED, REPORT_FILE, export_coreml

pytestmark = pytest.mark.slow  # ~40 s on a loaded 2-core machine: conversion + two palettizations


@pytest.fixture(scope="module")
def coreml_export(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml") / "sd3"
    # uniform palettization: seconds per bit width (kmeans takes minutes on a 2-core machine)
    return out, export_coreml(tiny_base, out, nbits=(8, 4), mode="uniform")


def test_package_has_the_sampler_shapes_under_the_onnx_names(coreml_export):
    out, report = coreml_export
    assert (out / PACKAGE / "Manifest.json").is_file() and (out / "denoiser-4bit.mlpackage").is_dir()
    assert json.loads((out / REPORT_FILE).read_text())["inputs"] == report["inputs"]
    assert [(i["name"], i["shape"]) for i in report["inputs"]] == [
        ("hidden_states", [2, 4, 16, 16]), ("encoder_hidden_states", [2, 24, 96]),
        ("pooled_projections", [2, 96]), ("timestep", [2])]
    assert [(o["name"], o["shape"]) for o in report["outputs"]] == [("out_sample", [2, 4, 16, 16])]
    assert report["graph"] == "torch.export"


def test_palettized_weights_read_back_close_to_the_torch_weights_and_fewer_bits_cost_more(coreml_export):
    _, report = coreml_export
    w = report["weights"]
    assert w["float"]["unmatched"] == 0 and w["float"]["palettized_layers"] == 0
    assert w["float"]["max_abs_error"] < 1e-2  # float16 rounding only
    for n in (8, 4):
        assert w[f"{n}bit"]["palettized_layers"] > 0 and w[f"{n}bit"]["unmatched"] == 0
    assert w["8bit"]["rel_rms_error_max"] < 0.05
    assert w["8bit"]["rel_rms_error_mean"] < w["4bit"]["rel_rms_error_mean"] < 0.5
    assert w["4bit"]["bytes"] < w["8bit"]["bytes"] < w["float"]["bytes"]


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the report holds a real prediction error instead")
def test_prediction_is_reported_as_skipped_off_macos(coreml_export):
    _, report = coreml_export
    assert report["prediction"] == {"skipped": PREDICTION_SKIPPED.format(platform=sys.platform)}


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS; coremltools on Linux converts only")
def test_prediction_matches_torch_on_macos(coreml_export):
    _, report = coreml_export
    assert report["prediction"]["max_abs_error"] < 0.05 * max(1.0, report["prediction"]["reference_max_abs"])


def test_bad_bit_width_is_refused_before_any_model_loads(tmp_path):
    with pytest.raises(ExportError, match="1, 2, 3, 4, 6 or 8 bits"):
        export_coreml(tmp_path, tmp_path / "out", nbits=(5,))
