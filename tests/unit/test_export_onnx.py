"""ONNX export of the denoiser: real exports of tiny models, checked with ONNX Runtime (no mocks)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from stunning.export import ExportError
from stunning.export.onnx import ONNX_FILE, REPORT_FILE, export_onnx, onnx_denoiser, run_session, session
from stunning.export.signature import capture, flat_denoiser
from stunning.families import ModelNotFoundError, get_family

pytestmark = pytest.mark.slow  # real ONNX exports (~20 s with the module's fixture): `make test`, not test-fast

PROMPTS = ("a red dress on a white background",)


@pytest.fixture(scope="module")
def sd3_export(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "sd3"
    return out, export_onnx(tiny_base, out, prompts=PROMPTS, seeds=(0,), steps=2)


def test_sd3_denoiser_exports_with_the_sampler_shapes_and_matches_torch(sd3_export):
    out, report = sd3_export
    assert json.loads((out / REPORT_FILE).read_text())["max_abs_error"] == report["max_abs_error"]
    assert (report["family"], report["component"], report["exporter"]) == ("sd3", "transformer", "dynamo")
    names = [i["name"] for i in report["inputs"]]
    assert names == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
    # one image with classifier-free guidance: the sampler calls the transformer with a batch of 2
    shapes = {i["name"]: i["shape"] for i in report["inputs"]}
    assert shapes["hidden_states"] == [2, 4, 16, 16] and shapes["timestep"] == [2]
    assert report["outputs"] == [{"name": "out_sample", "shape": [2, 4, 16, 16], "dtype": "float32"}]
    assert report["bytes"] == (out / ONNX_FILE).stat().st_size and not report["external_data"]
    assert report["max_abs_error"] < 1e-4
    assert report["sampling"]["onnx_denoiser_calls"] == 2
    assert all(i["psnr_db"] is None or i["psnr_db"] > 40 for i in report["images"])


def test_swapped_in_onnx_denoiser_draws_the_images_without_the_torch_weights(tiny_base, sd3_export):
    out, _ = sd3_export
    fam = get_family("sd3")
    pipe = fam.load_pipeline(tiny_base, torch.device("cpu"), torch.float32)
    signature = capture(fam, pipe, batch=1, guidance_scale=4.0)
    sess = session(out / ONNX_FILE)
    # A batch of 3 rows against the exported 2: split and padded, same numbers as torch.
    inputs = {s.name: torch.cat([v, v[:1]]) if s.batched else v for s, v in
              zip(signature.inputs, signature.example_tuple(), strict=True)}
    with torch.no_grad():
        ref = flat_denoiser(fam.denoiser(pipe), signature)(*inputs.values())
    assert torch.allclose(run_session(sess, signature, inputs), ref, atol=1e-4)

    reference = fam.generate(pipe, list(PROMPTS), [3], 2, 4.0)
    with torch.no_grad():
        for p in fam.denoiser(pipe).parameters():
            p.zero_()  # only the ONNX graph can still draw the image now
    with onnx_denoiser(fam, pipe, sess, signature) as runner:
        swapped = fam.generate(pipe, list(PROMPTS), [3], 2, 4.0)
    assert runner.calls == 2
    assert list(swapped[0].getdata()) == list(reference[0].getdata())
    zeroed = fam.generate(pipe, list(PROMPTS), [3], 2, 4.0)  # the swap is undone after the block
    assert list(zeroed[0].getdata()) != list(reference[0].getdata())


def test_sd_unet_exports_with_the_torchscript_exporter_to_external_data(tiny_sd_unet, tmp_path):
    report = export_onnx(tiny_sd_unet, tmp_path / "unet", exporter="torchscript", external_data=True,
                         prompts=PROMPTS, seeds=(0,), steps=2)
    assert (report["family"], report["component"]) == ("sd-unet", "unet")
    assert report["files"] == [ONNX_FILE, ONNX_FILE + ".data"] and report["external_data"]
    assert [i["name"] for i in report["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    # the UNet pipeline passes a 0-d integer timestep; the export takes a float vector
    assert {"name": "timestep", "shape": [2], "dtype": "float32"} in report["inputs"]
    assert report["max_abs_error"] < 1e-4
    assert all(i["psnr_db"] is None or i["psnr_db"] > 40 for i in report["images"])


def test_export_refuses_a_folder_that_is_not_a_model_and_an_unknown_exporter(tmp_path, tiny_base):
    with pytest.raises(ModelNotFoundError, match="not a diffusers model folder"):
        export_onnx(tmp_path, tmp_path / "out")
    with pytest.raises(ExportError, match="choose one of"):
        export_onnx(tiny_base, tmp_path / "out", exporter="tflite")
    assert not (tmp_path / "out").exists()


def test_cli_export_onnx_names_the_folder_and_the_fix(tmp_path):
    from stunning.cli import app

    result = CliRunner().invoke(app, ["export", "onnx", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "nope is not a folder" in result.output and "dvc repro merge" in result.output


def test_cli_export_refuses_an_unknown_family_before_loading_the_model(tiny_base, tmp_path):
    from stunning.cli import app

    result = CliRunner().invoke(app, ["export", "onnx", "--model", str(tiny_base), "--out", str(tmp_path / "o"),
                                      "--family", "sd9"])
    assert result.exit_code == 2
    assert "--family: unknown model family 'sd9'" in result.output
    assert not (tmp_path / "o").exists()
