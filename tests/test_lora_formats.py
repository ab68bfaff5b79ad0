"""Adapters exported in kohya/webui and ComfyUI key layouts mean the same as the diffusers file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from stunning.families import get_family
from stunning.families.formats import LAYOUTS, PREFIXES, convert_lora_file

TINY = {"sd3": "tiny_base", "sd-unet": "tiny_sd_unet", "sdxl": "tiny_sdxl", "flux": "tiny_flux"}
STOCK_KWARGS = {"sd3": {"text_encoder_3": None, "tokenizer_3": None}, "sdxl": {"add_watermarker": False}}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def saved_adapter(name, base, tmp_path, rank=4, alpha=8.0):
    """A LoRA with non-zero up weights and alpha != rank, saved by the family in the diffusers layout."""
    from peft import LoraConfig

    fam = get_family(name)
    pipe = fam.load_pipeline(base, torch.device("cpu"), torch.float32)
    denoiser = fam.denoiser(pipe)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_v"],
                                    init_lora_weights="gaussian"))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return fam.save_lora(pipe, tmp_path / "diffusers", metadata={"trigger_words": ["sks"], "rank": rank})


@pytest.mark.parametrize("name", list(TINY))
def test_kohya_layout_applies_the_same_weight_delta(name, request, tmp_path):
    """W + (alpha / rank) · up @ down from the kohya file (how webui/ComfyUI apply it) equals the
    weight stock diffusers gets when it fuses the diffusers-layout file."""
    base = request.getfixturevalue(TINY[name])
    fam = get_family(name)
    src = saved_adapter(name, base, tmp_path)
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


@pytest.mark.parametrize("name", ["sd-unet", "sdxl"])
def test_diffusers_reads_the_kohya_file_back_for_unet_families(name, request, tmp_path):
    base = request.getfixturevalue(TINY[name])
    fam = get_family(name)
    src = saved_adapter(name, base, tmp_path)
    dst = convert_lora_file(src, tmp_path / "out" / "comfy.safetensors", "comfyui", name)
    outputs = []
    for lora in (src, dst):
        pipe = fam.pipeline_class().from_pretrained(str(base), local_files_only=True, **STOCK_KWARGS.get(name, {}))
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        out = pipe("a red dress", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="np", height=32, width=32).images
        outputs.append(torch.from_numpy(out))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)


def test_layout_errors_are_clear(tiny_base, tmp_path):
    src = saved_adapter("sd3", tiny_base, tmp_path)
    with pytest.raises(ValueError, match="unknown LoRA layout 'onnx'"):
        convert_lora_file(src, tmp_path / "x.safetensors", "onnx", "sd3")
    with pytest.raises(ValueError, match="belongs to 'transformer'"):
        convert_lora_file(src, tmp_path / "x.safetensors", "kohya", "sd-unet")
    with pytest.raises(FileNotFoundError, match="no LoRA file"):
        convert_lora_file(tmp_path / "none.safetensors", tmp_path / "x.safetensors", "kohya", "sd3")
    copy = convert_lora_file(src, tmp_path / "copy.safetensors", "diffusers", "sd3")
    assert copy.read_bytes() == src.read_bytes()
    assert set(LAYOUTS) == {"diffusers", "kohya", "comfyui"}
