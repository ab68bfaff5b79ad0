"""Base-model references: local folder, cached Hugging Face id, single-file checkpoint."""

from __future__ import annotations

import shutil

import pytest

from stunning.families import ModelNotFoundError
from stunning.families.source import detect_family, resolve_base


def _fake_hub_cache(root, repo_id: str, model_dir, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_a_local_folder_is_used_as_is_and_checked(tiny_base, tmp_path):
    assert resolve_base(tiny_base, "sd3") == tiny_base
    with pytest.raises(ModelNotFoundError, match="lacks the component"):
        resolve_base(tiny_base, "sd-unet")  # an sd3 folder has no unet


def test_family_is_detected_from_the_pipeline_class(tiny_base, tiny_sd_unet, tmp_path):
    assert detect_family(tiny_base) == "sd3" and detect_family(tiny_sd_unet) == "sd-unet"
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ModelNotFoundError, match="KandinskyPipeline.*StableDiffusion3Pipeline"):
        detect_family(tmp_path / "odd")
    with pytest.raises(ModelNotFoundError, match="not a diffusers model folder"):
        detect_family(tmp_path)


def test_a_cached_hub_id_resolves_offline(tiny_sd_unet, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _fake_hub_cache(tmp_path / "hub", "studio/tiny-sd", tiny_sd_unet)
    assert resolve_base("studio/tiny-sd", "sd-unet") == snapshot
    assert resolve_base("studio/tiny-sd@0123456789abcdef0123456789abcdef01234567") == snapshot
    with pytest.raises(ModelNotFoundError) as err:
        resolve_base("studio/not-here", "sd-unet")
    message = str(err.value)
    assert "studio/not-here" in message and str(tmp_path / "hub") in message and "hf download studio/not-here" in message


def test_single_file_errors_say_what_is_missing(tmp_path, tiny_sd_unet):
    ckpt = tmp_path / "my-style.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"not.a.model": torch.zeros(2)}, str(ckpt))
    with pytest.raises(ModelNotFoundError, match="name its family"):
        resolve_base(ckpt)
    with pytest.raises(ModelNotFoundError, match="(?s)could not convert.*same architecture"):
        resolve_base(ckpt, "sd-unet", config=tiny_sd_unet, work_dir=tmp_path / "work")
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # nothing half-written
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="not a checkpoint"):
        resolve_base(tmp_path / "notes.txt", "sd-unet")
    with pytest.raises(ModelNotFoundError, match="neither an existing folder"):
        resolve_base(tmp_path / "nowhere", "sd-unet")


def test_model_path_command_prints_the_folder(tiny_sd_unet, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stunning.cli import app

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = _fake_hub_cache(tmp_path / "hub", "studio/tiny-sd", tiny_sd_unet)
    result = CliRunner().invoke(app, ["model-path", "studio/tiny-sd", "--family", "sd-unet"])
    assert result.exit_code == 0 and result.output.strip() == str(snapshot)
    result = CliRunner().invoke(app, ["model-path", "studio/elsewhere"])
    assert result.exit_code == 2 and "hf download studio/elsewhere" in result.output
