"""Int8 denoiser: saved, rebuilt from the quantization map, smaller, and close to float32."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from stunning.families import get_family
from stunning.quantize import (
    QuantizationError,
    image_fidelity,
    load_quantized,
    load_quantized_denoiser,
    measure,
    quantize_denoiser,
)

FAMILY = get_family("sd-unet")


@pytest.fixture(scope="module")
def quantized(tiny_sd_unet, tmp_path_factory):
    # Any pipeline folder works as the "fused" model; the tiny base is one.
    return quantize_denoiser(tiny_sd_unet, FAMILY, tmp_path_factory.mktemp("q") / "quantized")


def test_quantized_folder_is_complete_and_smaller(quantized, tiny_sd_unet):
    q = quantized.path
    assert {p.name for p in q.iterdir()} >= {
        "quantized_model.safetensors", "quantization_map.json", "config.json", "quantized.json"
    }
    qmap = json.loads((q / "quantization_map.json").read_text())
    assert qmap and all(v["weights"] == "qint8" for v in qmap.values())
    assert quantized.component == "unet"
    assert quantized.fp32_bytes == (tiny_sd_unet / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert 0 < quantized.size_ratio < 0.5  # int8 weights + fp32 scales/biases/norms
    assert 0 < quantized.quantized_memory_bytes < 0.5 * quantized.fp32_memory_bytes


def test_load_quantized_rebuilds_int8_modules(quantized, tiny_sd_unet):
    from optimum.quanto import QConv2d, QLinear

    model, component = load_quantized_denoiser(quantized.path)
    assert component == "unet"
    kinds = {type(m) for m in model.modules()}
    assert QLinear in kinds and QConv2d in kinds
    assert model.conv_in.weight.qtype.name == "qint8"
    pipe = load_quantized(tiny_sd_unet, quantized.path, "cpu")
    assert isinstance(pipe.unet.conv_in, QConv2d) and isinstance(pipe.vae, torch.nn.Module)


def test_measure_generates_with_both_and_reports_fidelity(quantized, tiny_sd_unet):
    rep = measure(tiny_sd_unet, quantized, FAMILY, ["a blue hat on a grey background"], [0, 1], 3, 4.0, "cpu")
    assert rep["int8_denoiser_bytes"] < rep["fp32_denoiser_bytes"]
    assert rep["size_ratio"] == pytest.approx(rep["int8_denoiser_bytes"] / rep["fp32_denoiser_bytes"], rel=1e-4)
    assert rep["peak_memory_mb_fp32"] > 0 and rep["peak_memory_mb_int8"] > 0
    assert rep["latency_s_int8"] > 0 and rep["fidelity_images"] == 2
    # int8 weights perturb the output a little, never wildly (a broken requantize would)
    assert 0 <= rep["quantization_mse"] < 1e-3
    assert 0 <= rep["quantization_max_abs"] <= 0.25


def test_image_fidelity_is_pixel_mse_in_unit_range():
    a = Image.new("RGB", (4, 4), (0, 0, 0))
    b = Image.new("RGB", (4, 4), (255, 0, 0))
    fid = image_fidelity([a], [b])
    assert fid["mse"] == pytest.approx(1 / 3)
    assert fid["max_abs"] == pytest.approx(1.0)


def test_missing_quantized_folder_says_how_to_rebuild(tmp_path):
    with pytest.raises(QuantizationError, match="dvc repro merge"):
        load_quantized_denoiser(tmp_path)
