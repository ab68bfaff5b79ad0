"""Base-model references: local folder, cached Hugging Face id, single-file checkpoint (a real round trip)."""

from __future__ import annotations

import shutil

import pytest
import torch

from stunning.families import ModelNotFoundError
from stunning.model_source import detect_family, resolve_base
from stunning.single_file import export_single_file

SD15_CONFIG_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # what diffusers names for SD 1.x files


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


@pytest.fixture(scope="module")
def tiny_single_file(tiny_sd_unet, tmp_path_factory):
    """The tiny SD-1.5 model as one checkpoint in the original (webui/LDM) key layout."""
    return export_single_file(tiny_sd_unet, tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors")


def _state_dicts(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    return {c: getattr(pipe, c).state_dict() for c in ("unet", "vae", "text_encoder")}


def test_single_file_is_in_the_original_layout(tiny_single_file):
    from safetensors import safe_open

    with safe_open(str(tiny_single_file), framework="pt") as f:
        keys = set(f.keys())
        vae_q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    # names webui checkpoints use (diffusers' own detection keys among them)
    assert {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
            "model.diffusion_model.out.2.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight",
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"} <= keys
    assert vae_q.ndim == 4  # 1x1 convolutions, as in the original VAE
    assert not any(".down_blocks." in k or ".resnets." in k or "conv_shortcut" in k for k in keys)
    assert not any(k.startswith("first_stage_model.") and ".to_" in k for k in keys)


def test_a_single_file_converts_once_to_the_same_model(tiny_single_file, tiny_sd_unet, tmp_path, caplog):
    import logging

    work = tmp_path / "work"
    folder = resolve_base(tiny_single_file, "sd-unet", config=tiny_sd_unet, work_dir=work)
    assert folder.parent == work and detect_family(folder) == "sd-unet"
    original, converted = _state_dicts(tiny_sd_unet), _state_dicts(folder)
    for component, weights in original.items():
        assert set(converted[component]) == set(weights), component
        for key, value in weights.items():
            assert torch.equal(converted[component][key], value), f"{component}.{key}"
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="stunning.model_source"):
        assert resolve_base(tiny_single_file, "sd-unet", config=tiny_sd_unet, work_dir=work) == folder
    assert "reusing" in caplog.text and (folder / "model_index.json").stat().st_mtime_ns == stamp
    assert [p.name for p in work.iterdir()] == [folder.name]  # no temporary folder left behind


def test_a_single_file_finds_its_configs_in_the_cache(tiny_single_file, tiny_sd_unet, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as err:
        resolve_base(tiny_single_file, "sd-unet", work_dir=tmp_path / "work")
    message = str(err.value)
    assert SD15_CONFIG_REPO in message and str(tmp_path / "hub") in message
    assert f"hf download {SD15_CONFIG_REPO} --include" in message and "--model-config" in message
    _fake_hub_cache(tmp_path / "hub", SD15_CONFIG_REPO, tiny_sd_unet)
    with pytest.raises(ModelNotFoundError, match="asked to convert it as 'sd3'.*'sd-unet' model.*--family sd-unet"):
        resolve_base(tiny_single_file, "sd3", work_dir=tmp_path / "work")
    folder = resolve_base(tiny_single_file, "sd-unet", work_dir=tmp_path / "work")
    unet = _state_dicts(folder)["unet"]
    assert all(torch.equal(unet[k], v) for k, v in _state_dicts(tiny_sd_unet)["unet"].items())


def test_single_file_family_and_lora_mistakes_are_named(tiny_single_file, tiny_sd_unet, tiny_base, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ModelNotFoundError, match="lacks the component"):  # an SD-1.5 config named as sd3
        resolve_base(tiny_single_file, "sd3", config=tiny_sd_unet, work_dir=tmp_path)
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 2), "lora_unet_conv_in.alpha": torch.ones(())},
              str(lora))
    with pytest.raises(ModelNotFoundError, match="holds LoRA weights, not a base model"):
        resolve_base(lora, "sd-unet", work_dir=tmp_path)
    with pytest.raises(ValueError, match="single-file export is implemented for.*FLUX.1.s full width"):
        export_single_file(tiny_base, tmp_path / "x.safetensors", "flux")


def test_model_path_command_prints_the_folder(tiny_sd_unet, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stunning.cli import app

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = _fake_hub_cache(tmp_path / "hub", "studio/tiny-sd", tiny_sd_unet)
    result = CliRunner().invoke(app, ["model-path", "studio/tiny-sd", "--family", "sd-unet"])
    assert result.exit_code == 0 and result.output.strip() == str(snapshot)
    result = CliRunner().invoke(app, ["model-path", "studio/elsewhere"])
    assert result.exit_code == 2 and "hf download studio/elsewhere" in result.output


def _components(family: str, folder) -> dict[str, dict[str, torch.Tensor]]:
    from stunning.families import get_family

    pipe = get_family(family).load_pipeline(folder, torch.device("cpu"), torch.float32)
    names = [n for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)]
    return {n: getattr(pipe, n).state_dict() for n in names}


@pytest.mark.parametrize("family, fixture, vae, in_file", [
    ("sdxl", "tiny_sdxl", True, {"unet", "vae", "text_encoder", "text_encoder_2"}),
    ("sd3", "tiny_base", True, {"transformer", "vae"}),
    ("sd3", "tiny_base", False, {"transformer"}),  # a "diffusion model only" file
])
def test_sdxl_and_sd3_single_files_round_trip(family, fixture, vae, in_file, request, tmp_path):
    """Export, then convert back with the configs of a *differently seeded* model of the same
    architecture: what the file holds must come back bit for bit, the rest from the config folder."""
    from safetensors import safe_open

    from stunning.tiny import build_tiny

    folder = request.getfixturevalue(fixture)
    ckpt = export_single_file(folder, tmp_path / f"{family}.safetensors", family, vae=vae)
    with safe_open(str(ckpt), framework="pt") as f:
        keys = set(f.keys())
    expected = {"sdxl": {"model.diffusion_model.label_emb.0.0.weight", "first_stage_model.encoder.conv_in.weight",
                         "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                         "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
                         "conditioner.embedders.1.model.text_projection"},
                "sd3": {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "model.diffusion_model.pos_embed",
                        "model.diffusion_model.final_layer.adaLN_modulation.1.weight",
                        "model.diffusion_model.joint_blocks.1.context_block.adaLN_modulation.1.bias"}}[family]
    assert expected <= keys and any(k.startswith("first_stage_model.") for k in keys) == vae
    other = build_tiny(tmp_path / "other", family, seed=1)
    converted = resolve_base(ckpt, family, config=other, work_dir=tmp_path / "work")
    original, config_side, back = (_components(family, f) for f in (folder, other, converted))
    assert set(back) == set(original) and in_file <= set(back)
    for component, weights in back.items():
        source = original if component in in_file else config_side
        assert set(weights) == set(source[component]), component
        for key, value in weights.items():
            assert torch.equal(value, source[component][key]), f"{component}.{key}"
    assert any(not torch.equal(v, original["vae"][k]) for k, v in config_side["vae"].items())  # seeds differ


def test_a_transformer_only_file_needs_a_config_with_weights(tiny_base, tmp_path):
    import shutil

    ckpt = export_single_file(tiny_base, tmp_path / "dm.safetensors", "sd3", vae=False)
    configs_only = tmp_path / "configs"
    shutil.copytree(tiny_base, configs_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    with pytest.raises(ModelNotFoundError, match=r"(?s)holds no (vae|text_encoder).*no (vae|text_encoder) weights either.*--model-config"):
        resolve_base(ckpt, "sd3", config=configs_only, work_dir=tmp_path / "work")


def test_export_checkpoint_command(tiny_sd_unet, tmp_path):
    from safetensors import safe_open
    from typer.testing import CliRunner

    from stunning.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["export-checkpoint", str(tiny_sd_unet), str(tmp_path / "look.safetensors")])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "look.safetensors")
    with safe_open(str(tmp_path / "look.safetensors"), framework="pt") as f:
        assert f.metadata()["stunning.family"] == "sd-unet" and "model.diffusion_model.out.2.weight" in f.keys()
    bad = runner.invoke(app, ["export-checkpoint", str(tmp_path), str(tmp_path / "x.safetensors")])
    assert bad.exit_code == 2 and "not a diffusers model folder" in bad.output


def test_sd35_blocks_map_to_the_mmdit_layout_and_back():
    """SD3.5's extras (RMS q/k norms, dual attention in early blocks) survive diffusers' own converter."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from stunning.single_file import mmdit_tensors

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12,
        pos_embed_max_size=8, dual_attention_layers=(0, 1), qk_norm="rms_norm",
    )
    original = dict(mmdit_tensors(model))
    assert {"joint_blocks.1.x_block.attn2.qkv.weight", "joint_blocks.2.context_block.attn.ln_k.weight"} <= set(original)
    assert "joint_blocks.2.context_block.attn.proj.weight" not in original  # the last block's text side ends early
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    weights = model.state_dict()
    assert set(back) == set(weights)
    assert all(torch.equal(back[k], v) for k, v in weights.items())
