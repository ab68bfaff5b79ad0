"""Adapters exported in kohya/webui and ComfyUI key layouts mean the same as the diffusers file."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from stunning.families import get_family
from stunning.lora_formats import LAYOUTS, PREFIXES, convert_lora_file
from tests.factories import random_lora

TINY = {"sd3": "tiny_base", "sd-unet": "tiny_sd_unet", "sdxl": "tiny_sdxl", "flux": "tiny_flux"}
STOCK_KWARGS = {"sd3": {"text_encoder_3": None, "tokenizer_3": None}, "sdxl": {"add_watermarker": False}}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# A LoRA with non-zero up weights and alpha != rank, saved by the family in the diffusers layout.
ADAPTER = {"rank": 4, "alpha": 8.0, "targets": ["to_q", "to_v"], "scale": 0.05,
           "metadata": {"trigger_words": ["sks"], "rank": 4}}
# The first text encoder's own LoRA (rank 2, alpha 6), saved the way diffusers' training scripts save one.
TEXT_ENCODER_ADAPTER = {"r": 2, "lora_alpha": 6.0, "target_modules": ["q_proj", "v_proj"]}


def comfyui_target(key: str, family: str) -> str:
    """The diffusers module a kohya/ComfyUI key patches, by the rules of ComfyUI's comfy/lora.py.

    model_lora_keys_unet: ``lora_unet_<diffusers UNet weight, "." -> "_">`` (via
    unet_to_diffusers) and, for SD3/FLUX, ``lora_transformer_<diffusers weight>`` (OneTrainer);
    model_lora_keys_clip: ``lora_te[1|2]_text_model_encoder_layers_<i>_<LORA_CLIP_MAP value>``.
    """
    clip_map = {"self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",
                "self_attn_v_proj": "self_attn.v_proj", "self_attn_out_proj": "self_attn.out_proj",
                "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}
    te = {"sd-unet": {"lora_te": "text_encoder"}, "sdxl": {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"},
          "sd3": {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}, "flux": {"lora_te1": "text_encoder"}}
    name = key.split(".")[0]
    m = re.fullmatch(r"(lora_te\d?)_text_model_encoder_layers_(\d+)_(\w+)", name)
    if m:
        return f"{te[family][m[1]]}.text_model.encoder.layers.{m[2]}.{clip_map[m[3]]}"
    prefix = "lora_unet_" if family in ("sd-unet", "sdxl") else "lora_transformer_"
    assert name.startswith(prefix), key
    return name[len(prefix):]  # underscores: resolved against the model's module names below


def _flat(module_name: str) -> str:
    return module_name.replace(".", "_")


@pytest.mark.parametrize("name", list(TINY))
def test_kohya_layout_applies_the_same_weight_delta(name, request, tmp_path):
    """W + (alpha / rank) · up @ down from the kohya file (how webui/ComfyUI apply it) equals the
    weight stock diffusers gets when it fuses the diffusers-layout file."""
    base = request.getfixturevalue(TINY[name])
    fam = get_family(name)
    src = random_lora(base, tmp_path / "diffusers", name, 0, **ADAPTER)
    dst = convert_lora_file(src, tmp_path / "kohya.safetensors", "kohya", name)
    kohya = load_file(str(dst))
    prefix = PREFIXES[name][fam.lora_component]
    assert kohya and all(k.startswith(prefix + "_") for k in kohya)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else "alpha" for k in kohya} == {"lora_down", "lora_up", "alpha"}

    plain = fam.pipeline_class().from_pretrained(str(base), local_files_only=True, **STOCK_KWARGS.get(name, {}))
    fused = fam.pipeline_class().from_pretrained(str(base), local_files_only=True, **STOCK_KWARGS.get(name, {}))
    fused.load_lora_weights(str(src.parent))
    fused.fuse_lora()
    fused.unload_lora_weights()
    base_w = dict(getattr(plain, fam.lora_component).named_parameters())
    fused_w = dict(getattr(fused, fam.lora_component).named_parameters())
    n_checked = 0
    saved = [k for k in load_file(str(src)) if k.endswith((".lora_B.weight", ".lora.up.weight"))]
    for k in saved:
        module = k.split(".", 1)[1].removesuffix(".lora_B.weight").removesuffix(".lora.up.weight")
        key = f"{prefix}_{module.replace('.', '_')}"
        down, up, alpha = kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"], float(kohya[f"{key}.alpha"])
        assert alpha == 8.0 and down.shape[0] == 4
        expected = base_w[f"{module}.weight"] + (alpha / down.shape[0]) * up @ down
        torch.testing.assert_close(fused_w[f"{module}.weight"], expected, rtol=1e-5, atol=1e-6)
        n_checked += 1
    assert n_checked >= 2

    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["stunning.layout"] == "kohya" and json.loads(meta["stunning.trigger_words"]) == ["sks"]


@pytest.mark.parametrize("name", ["sd-unet", "sdxl", "flux"])
def test_diffusers_reads_the_converted_file_back(name, request, tmp_path):
    """Stock diffusers loads the kohya/ComfyUI file (kohya SD/SDXL keys, OneTrainer FLUX keys) and
    generates exactly what the diffusers-layout file generates."""
    base = request.getfixturevalue(TINY[name])
    fam = get_family(name)
    src = random_lora(base, tmp_path / "diffusers", name, 0, **ADAPTER)
    dst = convert_lora_file(src, tmp_path / "out" / "comfy.safetensors", "comfyui", name)
    outputs = []
    for lora in (src, dst, None):
        pipe = fam.pipeline_class().from_pretrained(str(base), local_files_only=True, **STOCK_KWARGS.get(name, {}))
        if lora is not None:
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        out = pipe("a red dress", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="np", height=32, width=32).images
        outputs.append(torch.from_numpy(out))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    assert (outputs[0] - outputs[2]).abs().max() > 1e-3  # the adapter does change the image


def test_text_encoder_layers_get_comfyui_clip_names_and_their_own_alpha(tiny_sd_unet, tmp_path):
    """A LoRA on the UNet and the CLIP text encoder: every kohya key names, by ComfyUI's rules, a
    module of the model, and W + (alpha / rank) up @ down is what diffusers fuses (both components,
    each with its own alpha)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya

    src = random_lora(tiny_sd_unet, tmp_path / "diffusers", "sd-unet", 0, **ADAPTER, text_encoder=TEXT_ENCODER_ADAPTER)
    kohya = load_file(str(convert_lora_file(src, tmp_path / "k.safetensors", "kohya", "sd-unet")))
    plain = StableDiffusionPipeline.from_pretrained(str(tiny_sd_unet), local_files_only=True)
    fused = StableDiffusionPipeline.from_pretrained(str(tiny_sd_unet), local_files_only=True)
    fused.load_lora_weights(str(src.parent))
    fused.fuse_lora(components=["unet", "text_encoder"])
    fused.unload_lora_weights()

    def weights(pipe):
        out = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
        te = pipe.text_encoder.state_dict()  # transformers >= 5.6 has no `text_model.` level
        out.update({f"text_encoder.text_model.{k.removeprefix('text_model.')}": v for k, v in te.items()})
        return out

    base_w, fused_w = weights(plain), weights(fused)
    unet_modules = {_flat(k.removesuffix(".weight")): k.removesuffix(".weight") for k in plain.unet.state_dict()}
    names = {k.split(".")[0] for k in kohya}
    assert {n.split("_", 2)[1] for n in names} == {"unet", "te"}
    for name in names:
        target = comfyui_target(name, "sd-unet")
        target = f"unet.{unet_modules[target]}" if name.startswith("lora_unet_") else target
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        alpha = float(kohya[f"{name}.alpha"])
        assert (down.shape[0], alpha) == ((4, 8.0) if target.startswith("unet.") else (2, 6.0))
        expected = base_w[f"{target}.weight"] + (alpha / down.shape[0]) * up @ down
        torch.testing.assert_close(fused_w[f"{target}.weight"], expected, rtol=1e-5, atol=1e-6)

    # diffusers' own PEFT -> kohya helper names the UNet modules the same way (but writes alpha = rank)
    peft_style = {k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v
                  for k, v in load_file(str(src)).items() if k.startswith("unet.")}
    theirs = convert_state_dict_to_kohya(peft_style)
    assert {k for k in theirs if k.startswith("lora_unet_")} == {k for k in kohya if k.startswith("lora_unet_")}


def test_layout_errors_are_clear(tiny_base, tmp_path):
    src = random_lora(tiny_base, tmp_path / "diffusers", "sd3", 0, **ADAPTER)
    with pytest.raises(ValueError, match="unknown LoRA layout 'onnx'"):
        convert_lora_file(src, tmp_path / "x.safetensors", "onnx", "sd3")
    with pytest.raises(ValueError, match="belongs to 'transformer'"):
        convert_lora_file(src, tmp_path / "x.safetensors", "kohya", "sd-unet")
    with pytest.raises(FileNotFoundError, match="no LoRA file"):
        convert_lora_file(tmp_path / "none.safetensors", tmp_path / "x.safetensors", "kohya", "sd3")
    copy = convert_lora_file(src, tmp_path / "copy.safetensors", "diffusers", "sd3")
    assert copy.read_bytes() == src.read_bytes()
    assert set(LAYOUTS) == {"diffusers", "kohya", "comfyui"}
