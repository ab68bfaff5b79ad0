"""`stunning train`: a one-off LoRA run from a folder of photos (tiny sd3 model, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from stunning.cli import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def photos(folder: Path, n: int = 5, captions: int = 0, seed: int = 0) -> Path:
    """`n` distinct 40x40 photos (random blocks: sharp, no near-duplicates); the first `captions` captioned."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        blocks = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((40, 40), Image.NEAREST).save(folder / f"img{i}.png")
        if i < captions:
            (folder / f"img{i}.txt").write_text(f"a red dress number {i}")
    return folder


def invoke(*args: str):
    return runner.invoke(app, ["train", *args], catch_exceptions=False)


def test_a_flat_folder_with_a_prompt_trains_and_resumes(tiny_base, tmp_path):
    data = photos(tmp_path / "my-look", n=5, captions=2)
    out = tmp_path / "out"
    args = ["--model", str(tiny_base), "--data", str(data), "--prompt", "a photo in sks style", "--steps", "4",
            "--batch-size", "2", "--lr", "1e-3", "--out", str(out), "--trigger", "sks", "--device", "cpu",
            "--export", "kohya"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "family sd3" in result.output and "resolution 32 px" in result.output  # both detected from the model
    assert "my-look: 5 image(s), 3 captioned with the prompt" in result.output
    summary = json.loads((out / "summary.json").read_text())
    style = summary["styles"]["my-look"]
    assert Path(style["adapter"]).is_file() and style["steps"] == 4 and style["batch_size"] == 2
    assert style["steps_per_s"] > 0 and style["peak_memory_mb"] > 0 and style["images"] == 5
    kohya = Path(style["exports"]["kohya"])
    assert kohya.is_file() and all(k.startswith("lora_transformer_") for k in load_file(str(kohya)))
    converted = runner.invoke(app, ["convert-lora", style["adapter"], "--layout", "comfyui"])
    assert converted.exit_code == 0 and "family sd3" in converted.output, converted.output
    assert (Path(style["adapter"]).parent / "pytorch_lora_weights-comfyui.safetensors").is_file()
    captions = sorted(p.read_text().strip() for p in (out / ".work" / "raw" / "my-look").glob("*.txt"))
    assert captions.count("a photo in sks style") == 3 and "a red dress number 0" in captions

    # The same command again: the finished run is found in the checkpoints, not retrained.
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "summary.json").read_text())["styles"]["my-look"]["resumed_from_step"] == 4


def test_an_interrupted_run_resumes_from_its_checkpoint(tiny_base, tmp_path):
    from stunning.oneoff import OneOffOptions, train_oneoff

    data = photos(tmp_path / "look", n=4)
    opts = OneOffOptions(model=str(tiny_base), data=data, out=tmp_path / "out", prompt="a photo in sks style",
                         steps=8, batch_size="auto", learning_rate=1e-3, device="cpu",
                         config_overrides={"checkpoint_every": 2, "max_batch_size": 4})

    def crash_at_5(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_oneoff(opts, on_step=crash_at_5)
    summary = train_oneoff(opts)
    style = summary["styles"]["look"]
    assert style["resumed_from_step"] == 4 and style["steps"] == 8
    assert 1 <= style["batch_size"] <= 4  # auto, probed once and kept in the checkpoint


def test_uncaptioned_images_without_a_prompt_are_named(tiny_base, tmp_path):
    data = photos(tmp_path / "look", n=3, captions=1)
    result = runner.invoke(app, ["train", "--model", str(tiny_base), "--data", str(data), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "img1.png: has no caption" in result.output and "--prompt" in result.output


def test_bad_model_data_and_options_are_clear_errors(tiny_base, tmp_path):
    data = photos(tmp_path / "look", n=3)
    result = runner.invoke(app, ["train", "--model", str(tmp_path / "nowhere"), "--data", str(data), "--prompt", "x y"])
    assert result.exit_code == 2 and "not found" in result.output and "Hugging Face" in result.output
    result = runner.invoke(app, ["train", "--model", str(tiny_base), "--data", str(tmp_path / "none"), "--prompt", "x y"])
    assert result.exit_code == 2 and "not a folder" in result.output
    result = runner.invoke(app, ["train", "--model", str(tiny_base), "--data", str(data), "--batch-size", "lots"])
    assert result.exit_code == 2 and "--batch-size 'lots'" in result.output
    result = runner.invoke(app, ["train", "--model", str(tiny_base), "--data", str(data), "--prompt", "x y",
                                 "--family", "sd-unet", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "lacks the component" in result.output


def test_one_subfolder_per_style_trains_the_chosen_style(tiny_base, tmp_path):
    photos(tmp_path / "set" / "Noir Look", n=3, seed=1)
    photos(tmp_path / "set" / "colour", n=3, seed=2)
    out = tmp_path / "out"
    result = invoke("--model", str(tiny_base), "--data", str(tmp_path / "set"), "--prompt", "a photo in sks style",
                    "--style", "noir-look", "--steps", "2", "--batch-size", "1", "--out", str(out), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert list(json.loads((out / "summary.json").read_text())["styles"]) == ["noir-look"]
    result = runner.invoke(app, ["train", "--model", str(tiny_base), "--data", str(tmp_path / "set"),
                                 "--prompt", "x y", "--style", "sepia", "--out", str(out)])
    assert result.exit_code == 2 and "colour" in result.output and "noir-look" in result.output


def test_convert_lora_errors(tmp_path):
    result = runner.invoke(app, ["convert-lora", str(tmp_path / "none.safetensors")])
    assert result.exit_code == 2 and "no such file" in result.output
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    result = runner.invoke(app, ["convert-lora", str(tmp_path / "bad.safetensors")])
    assert result.exit_code == 2 and "not a safetensors file" in result.output
