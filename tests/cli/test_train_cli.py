"""`stunning train`: a one-off LoRA run from a folder of photos (tiny sd3/sd-unet models, a few steps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from stunning.cli import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "a photo in sks style"


def photos(folder: Path, n: int = 5, captions: int = 0, seed: int = 0, size: int = 40) -> Path:
    """`n` distinct `size`-px photos (random blocks: sharp, no near-duplicates); the first `captions` captioned."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        blocks = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((size, size), Image.NEAREST).save(folder / f"img{i}.png")
        if i < captions:
            (folder / f"img{i}.txt").write_text(f"a red dress number {i}")
    return folder


def invoke(*args: str):
    return runner.invoke(app, ["train", *args], catch_exceptions=False)


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_a_flat_folder_with_a_prompt_trains_reports_drops_and_resumes(tiny_base, tmp_path):
    data = photos(tmp_path / "my-look", n=5, captions=2)
    shutil.copy(data / "img3.png", data / "copy.png")  # the same bytes twice: one is skipped
    Image.new("RGB", (8, 8), "red").save(data / "thumb.png")  # below half the resolution: skipped
    (data / "thumb.txt").write_text("a thumbnail")
    out = tmp_path / "out"
    args = ["--model", str(tiny_base), "--data", str(data), "--prompt", PROMPT, "--steps", "4",
            "--batch-size", "2", "--lr", "1e-3", "--out", str(out), "--trigger", "sks", "--device", "cpu",
            "--export", "kohya"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    # The plan: family and resolution detected from the model, the device resolved.
    assert "(family sd3, detected), resolution 32 px (the model's own), device cpu" in result.output
    assert "my-look: 7 image(s)" in result.output and "4 captioned with the prompt" in result.output
    # What was dropped and why, named by the user's own file.
    assert f"skipped {data / 'img3.png'}: duplicate_file" in result.output
    assert f"skipped {data / 'thumb.png'}: too_small" in result.output
    assert "kept: my-look 5 " in result.output and "training 4 steps, rank 16" in result.output
    summary = summary_of(out)
    assert summary["family"] == "sd3" and summary["resolution"] == 32 and summary["mlflow_tracking_uri"] is None
    style = summary["styles"]["my-look"]
    adapter = out / "my-look" / "pytorch_lora_weights.safetensors"
    assert style["adapter"] == str(adapter) and adapter.is_file()
    assert style["steps"] == 4 and style["batch_size"] == 2 and style["images"] == 5 and style["device"] == "cpu"
    assert style["steps_per_s"] > 0 and style["peak_memory_mb"] > 0 and np.isfinite(style["final_loss"])
    assert style["resumed_from_step"] == 0 and summary["train"]["trigger_words"] == ["sks"]
    assert f"adapter my-look (diffusers): {adapter}" in result.output
    kohya = Path(style["exports"]["kohya"])
    assert kohya.is_file() and all(k.startswith("lora_transformer_") for k in load_file(str(kohya)))
    converted = runner.invoke(app, ["convert-lora", str(adapter), "--layout", "comfyui"])
    assert converted.exit_code == 0 and "family sd3" in converted.output, converted.output
    assert (adapter.parent / "pytorch_lora_weights-comfyui.safetensors").is_file()
    assert not list(out.glob("summary.json.*")) and not list(out.glob(".summary*"))  # atomic: no temp left
    captions = sorted(p.read_text().strip() for p in (out / ".work" / "raw" / "my-look").glob("*.txt"))
    assert captions.count(PROMPT) == 4 and "a red dress number 0" in captions and "a thumbnail" in captions
    assert (out / ".work" / "checkpoints").is_dir() and any((out / ".work" / "cache").iterdir())

    # The same command again: the finished run is found in the checkpoints, not retrained.
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    style = summary_of(out)["styles"]["my-look"]
    assert style["resumed_from_step"] == 4 and style["steps_per_s"] is None and style["steps"] == 4

    # --no-resume starts over.
    fresh = invoke(*args, "--no-resume")
    assert fresh.exit_code == 0, fresh.output
    style = summary_of(out)["styles"]["my-look"]
    assert style["resumed_from_step"] == 0 and style["steps_per_s"] > 0


def test_an_interrupted_run_resumes_from_its_checkpoint_with_batch_size_auto(tiny_base, tmp_path):
    from stunning.oneoff import OneOffOptions, train_oneoff

    data = photos(tmp_path / "look", n=4)
    opts = OneOffOptions(model=str(tiny_base), data=data, out=tmp_path / "out", prompt=PROMPT,
                         steps=8, batch_size="auto", learning_rate=1e-3, device="cpu",
                         config_overrides={"checkpoint_every": 2, "max_batch_size": 4})
    seen: list[int] = []

    def crash_at_5(step, loss):
        seen.append(step)
        if step == 5:
            raise KeyboardInterrupt

    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        train_oneoff(opts, on_step=crash_at_5, echo=lines.append)
    assert seen == [1, 2, 3, 4, 5] and any("batch size auto" in line for line in lines)
    assert not (tmp_path / "out" / "look").exists()  # no adapter from a run that did not finish
    summary = train_oneoff(opts, on_step=lambda step, loss: seen.append(step))
    style = summary["styles"]["look"]
    assert style["resumed_from_step"] == 4 and style["steps"] == 8 and seen[5:] == [5, 6, 7, 8]
    assert isinstance(style["batch_size"], int) and 1 <= style["batch_size"] <= 4  # probed, kept in the checkpoint
    assert Path(style["adapter"]).is_file()


def test_the_family_is_detected_from_model_index(tiny_sd_unet, tmp_path):
    """An SD-1.x-layout folder trains as sd-unet with no --family (the sd3 case is in the first test)."""
    out = tmp_path / "out"
    result = invoke("--model", str(tiny_sd_unet), "--data", str(photos(tmp_path / "look", n=3)), "--prompt", PROMPT,
                    "--steps", "1", "--batch-size", "1", "--out", str(out), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "(family sd-unet, detected)" in result.output
    assert summary_of(out)["family"] == "sd-unet" and (out / "look" / "pytorch_lora_weights.safetensors").is_file()


def test_uncaptioned_images_without_a_prompt_are_named(tiny_base, tmp_path):
    data = photos(tmp_path / "look", n=3, captions=1)
    result = runner.invoke(app, ["train", "--model", str(tiny_base), "--data", str(data), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.exception is not None and not isinstance(result.exception, ValueError)
    assert f"{data / 'img1.png'}: has no caption" in result.output
    assert "--prompt" in result.output and "caption file" in result.output


def test_bad_model_data_and_options_fail_before_any_work(tiny_base, tmp_path):
    data = photos(tmp_path / "look", n=3)
    out = tmp_path / "o"

    def error(*args: str) -> str:
        result = runner.invoke(app, ["train", "--model", str(tiny_base), "--data", str(data), "--prompt", PROMPT,
                                     "--out", str(out), *args])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and not (out / ".work" / "raw").exists(), result.output
        return result.output

    result = runner.invoke(app, ["train", "--model", str(tmp_path / "nowhere"), "--data", str(data), "--prompt", PROMPT,
                                 "--out", str(out)])  # never the default ./lora-out of the repo
    assert result.exit_code == 2 and "not found" in result.output and "Hugging Face" in result.output
    index = tmp_path / "alien" / "model_index.json"
    index.parent.mkdir()
    index.write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    result = runner.invoke(app, ["train", "--model", str(index.parent), "--data", str(data), "--prompt", PROMPT,
                                 "--out", str(out)])
    assert result.exit_code == 2 and "'KandinskyPipeline' is not one this project trains" in result.output
    assert "StableDiffusion3Pipeline (sd3)" in result.output

    assert "not a folder" in error("--data", str(tmp_path / "none"))
    assert "--batch-size 'lots'" in error("--batch-size", "lots")
    assert "lacks the component" in error("--family", "sd-unet")
    assert "--family nope: not a model family" in error("--family", "nope")
    assert "--device tpu: unknown device" in error("--device", "tpu")
    assert "--export webui: unknown LoRA layout" in error("--export", "webui")
    assert "--resolution 30: this sd3 model needs a multiple of 4 px; use 28 or 32" in error("--resolution", "30")
    cfg = tmp_path / "train.yaml"
    cfg.write_text("train:\n  lr_sheduler: cosine\n")
    assert "lr_sheduler: unknown key" in error("--config", str(cfg))
    cfg.write_text("- a list\n")
    assert "expected a mapping" in error("--config", str(cfg))
    assert "cannot read it as YAML" in error("--config", str(tmp_path / "missing.yaml"))


def test_photos_that_all_fail_the_checks_are_a_clear_error(tiny_base, tmp_path):
    data = photos(tmp_path / "thumbs", n=2, size=8)
    result = runner.invoke(app, ["train", "--model", str(tiny_base), "--data", str(data), "--prompt", PROMPT,
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert f"skipped {data / 'img0.png'}: too_small" in result.output
    assert "no photo of style 'thumbs' is left to train on" in result.output and "2 too_small" in result.output
    assert "smaller --resolution" in result.output


def test_one_subfolder_per_style_trains_the_chosen_style_with_config_keys(tiny_base, tmp_path):
    photos(tmp_path / "set" / "Noir Look", n=3, seed=1)
    photos(tmp_path / "set" / "colour", n=3, seed=2)
    out = tmp_path / "out"
    cfg = tmp_path / "train.yaml"
    cfg.write_text("train:\n  lr_scheduler: cosine\n  steps: 50\n  rank: 2\n")
    result = invoke("--model", str(tiny_base), "--data", str(tmp_path / "set"), "--prompt", PROMPT,
                    "--style", "noir-look", "--steps", "2", "--batch-size", "1", "--out", str(out), "--device", "cpu",
                    "--config", str(cfg))
    assert result.exit_code == 0, result.output
    summary = summary_of(out)
    assert list(summary["styles"]) == ["noir-look"] and summary["styles"]["noir-look"]["steps"] == 2
    # The file's keys apply, except where the command line set the option (--steps).
    assert summary["train"]["lr_scheduler"] == "cosine" and summary["train"]["rank"] == 2
    assert summary["train"]["alpha"] == 2.0 and summary["train"]["steps"] == 2
    result = runner.invoke(app, ["train", "--model", str(tiny_base), "--data", str(tmp_path / "set"),
                                 "--prompt", PROMPT, "--style", "sepia", "--out", str(out)])
    assert result.exit_code == 2 and "colour" in result.output and "noir-look" in result.output


def test_mlflow_only_when_asked(tiny_base, tmp_path):
    import mlflow

    out = tmp_path / "out"
    try:
        result = invoke("--model", str(tiny_base), "--data", str(photos(tmp_path / "look", n=3)), "--prompt", PROMPT,
                        "--steps", "1", "--batch-size", "1", "--out", str(out), "--device", "cpu", "--mlflow")
        assert result.exit_code == 0, result.output
        summary = summary_of(out)
        assert summary["mlflow_tracking_uri"] == f"sqlite:///{(out / 'mlruns' / 'mlflow.db').resolve()}"
        run = mlflow.get_run(summary["styles"]["look"]["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["stage"] == "oneoff"
        assert mlflow.get_experiment(run.info.experiment_id).name == "stunning-oneoff"
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def test_ctrl_c_says_how_to_resume(tiny_base, tmp_path, monkeypatch):
    import stunning.oneoff

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stunning.oneoff, "stage_data", interrupted)
    result = runner.invoke(app, ["train", "--model", str(tiny_base), "--data", str(tmp_path), "--out",
                                 str(tmp_path / "o")])
    assert result.exit_code == 130 and "Run the same command again" in result.output


def test_size_multiple_reads_real_architectures_from_configs(tmp_path):
    from stunning.families import get_family
    from stunning.oneoff import size_multiple

    def folder(name: str, vae_blocks: int, **denoiser) -> Path:
        root = tmp_path / name
        for component, config in (("vae", {"block_out_channels": [128] * vae_blocks}),
                                  ("unet" if "down_block_types" in denoiser else "transformer", denoiser)):
            (root / component).mkdir(parents=True)
            (root / component / "config.json").write_text(json.dumps(config))
        return root

    assert size_multiple(folder("sd15", 4, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]),
                         get_family("sd-unet")) == 64
    assert size_multiple(folder("sdxl", 4, down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2),
                         get_family("sdxl")) == 32
    assert size_multiple(folder("sd3", 4, patch_size=2), get_family("sd3")) == 16
    assert size_multiple(folder("flux", 4, patch_size=1), get_family("flux")) == 16


def test_a_small_set_trains_on_every_photo(tiny_base, tmp_path):
    result = invoke("--model", str(tiny_base), "--data", str(photos(tmp_path / "look", n=3)), "--prompt", PROMPT,
                    "--steps", "1", "--batch-size", "1", "--out", str(tmp_path / "out"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "kept: look 3 (3 train, 0 val)" in result.output


def test_convert_lora_errors(tmp_path):
    result = runner.invoke(app, ["convert-lora", str(tmp_path / "none.safetensors")])
    assert result.exit_code == 2 and "no such file" in result.output
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    result = runner.invoke(app, ["convert-lora", str(tmp_path / "bad.safetensors")])
    assert result.exit_code == 2 and "not a safetensors file" in result.output


def test_defaults_come_from_the_config_models_and_the_family():
    """One source per default: TrainConfig (= params.yaml), the one-off's own few, the family's targets."""
    from stunning.config import TrainConfig
    from stunning.families import get_family
    from stunning.oneoff import ONEOFF_TRAIN_DEFAULTS, OneOffOptions, oneoff_default, train_config

    for name in ("sd3", "sd-unet"):
        fam = get_family(name)
        cfg = train_config(OneOffOptions(model="m", data=Path("d")), fam)
        assert cfg.target_modules == list(fam.default_lora_targets)
        assert (cfg.steps, cfg.learning_rate, cfg.batch_size, cfg.caption_dropout) == (1000, 1e-4, "auto", 0.0) == tuple(
            ONEOFF_TRAIN_DEFAULTS[k] for k in ("steps", "learning_rate", "batch_size", "caption_dropout"))
        assert cfg.checkpoint_every == 100 and cfg.alpha == float(cfg.rank)
        shipped = TrainConfig()
        for key in ("rank", "dropout", "lr_scheduler", "keep_checkpoints", "mixed_precision"):
            assert getattr(cfg, key) == getattr(shipped, key) == oneoff_default(key), key
    # An option given beats the --config file's key; the file beats the defaults.
    opts = OneOffOptions(model="m", data=Path("d"), steps=8, config_overrides={"steps": 50, "rank": 2})
    cfg = train_config(opts, get_family("sd3"))
    assert (cfg.steps, cfg.rank, cfg.alpha, cfg.checkpoint_every) == (8, 2, 2.0, 2)


def test_train_help_shows_the_library_defaults():
    from stunning.config import TrainConfig

    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for default in ("(default: 1000)", f"(default: {TrainConfig().rank})", "(default: 0.0001)", "(default: auto)",
                    "(default: lora-out)"):
        assert default in text, default
