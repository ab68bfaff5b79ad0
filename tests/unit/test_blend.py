"""Blends are the exact weighted sum of the style deltas, and load/fuse with stock diffusers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stunning.blend import BlendError, blend_adapters, fuse, lora_deltas, read_lora
from stunning.families import get_family
from tests.factories import random_lora

FAMILY = get_family("sd-unet")
CPU = torch.device("cpu")
PROMPTS = ["a red dress on a white background", "a blue hat on a grey background"]
SEEDS = [0, 1]


def unet_weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


def stock_delta(base: Path, lora_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW as stock diffusers applies it: load_lora_weights + fuse_lora, minus the base weights."""
    pipe = FAMILY.load_pipeline(base, CPU, torch.float32)
    w0 = unet_weights(pipe)
    pipe.load_lora_weights(str(lora_dir))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    w1 = unet_weights(pipe)
    assert w0.keys() == w1.keys()
    return {k: w1[k] - w0[k] for k in w0 if not torch.equal(w1[k], w0[k])}


def to_array(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])


@pytest.fixture(scope="module")
def adapters(tiny_sd_unet, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "impressionist": random_lora(tiny_sd_unet, root / "impressionist", "sd-unet", seed=1, rank=4, alpha=4.0).parent,
        "noir": random_lora(tiny_sd_unet, root / "noir", "sd-unet", seed=2, rank=4, alpha=8.0).parent,
        # different rank, fewer targets and rsLoRA scaling: exercises rank_pattern and scales
        "sketch": random_lora(tiny_sd_unet, root / "sketch", "sd-unet", seed=3, rank=2, alpha=3.0,
                              targets=["to_q", "to_k"], rslora=True).parent,
    }


def test_blend_delta_is_exact_weighted_sum(adapters, tmp_path):
    weights = {"impressionist": 0.7, "noir": -0.3}
    res = blend_adapters(adapters, weights, tmp_path / "mix")
    blended = lora_deltas(read_lora(tmp_path / "mix"))["unet"]
    expected: dict[str, torch.Tensor] = {}
    for style, w in weights.items():
        for m, d in lora_deltas(read_lora(adapters[style]), w)["unet"].items():
            expected[m] = expected.get(m, 0) + d
    assert blended.keys() == expected.keys()
    for m in expected:
        torch.testing.assert_close(blended[m], expected[m], atol=1e-5, rtol=0)
    # the rank is the sum of the ranks, with scale 1 (alpha == r) in the saved metadata
    assert res.rank == {"unet": 8}
    lora = read_lora(tmp_path / "mix")
    assert lora.configs["unet"]["r"] == 8 and lora.configs["unet"]["lora_alpha"] == 8
    spec = yaml.safe_load((tmp_path / "mix" / "blend.yaml").read_text())
    assert spec["weights"] == weights and spec["name"] == "mix"


def test_stock_diffusers_applies_blend_as_weighted_sum(tiny_sd_unet, adapters, tmp_path):
    """Against diffusers' own semantics (alpha, rsLoRA, rank_pattern), not our reading of them."""
    weights = {"noir": 0.5, "sketch": 1.5}
    blend_adapters(adapters, weights, tmp_path / "mix")
    got = stock_delta(tiny_sd_unet, tmp_path / "mix")
    expected: dict[str, torch.Tensor] = {}
    for style, w in weights.items():
        for k, d in stock_delta(tiny_sd_unet, adapters[style]).items():
            expected[k] = expected.get(k, 0) + w * d
    assert got.keys() == expected.keys()
    assert any("to_v" in k for k in got) and any("to_q" in k for k in got)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=0)


def test_fused_pipeline_loads_stock_and_matches_base_plus_lora(tiny_sd_unet, adapters, tmp_path):
    from diffusers import StableDiffusionPipeline

    blend_adapters(adapters, {"impressionist": 0.5, "noir": 0.5}, tmp_path / "half")
    fuse(tiny_sd_unet, FAMILY, tmp_path / "half", tmp_path / "fused")
    assert (tmp_path / "fused" / "model_index.json").is_file()

    fused = StableDiffusionPipeline.from_pretrained(str(tmp_path / "fused"), local_files_only=True)
    fused.set_progress_bar_config(disable=True)
    assert not any("lora" in k for k in fused.unet.state_dict())  # plain weights, no PEFT layers
    with_lora = FAMILY.load_pipeline(tiny_sd_unet, CPU, torch.float32)
    base_out = to_array(FAMILY.generate(with_lora, PROMPTS, SEEDS, 4, 4.0))
    with_lora.load_lora_weights(str(tmp_path / "half"))
    lora_out = to_array(FAMILY.generate(with_lora, PROMPTS, SEEDS, 4, 4.0))
    fused_out = to_array(FAMILY.generate(fused, PROMPTS, SEEDS, 4, 4.0))

    change = float(((lora_out - base_out) ** 2).mean())
    assert change > 1e-4, "the blend should visibly change the output"
    assert float(((fused_out - lora_out) ** 2).mean()) < 1e-3 * change + 1e-6


def test_missing_adapter_is_a_clear_error(adapters, tmp_path):
    with pytest.raises(BlendError, match="pytorch_lora_weights.safetensors"):
        blend_adapters({"noir": tmp_path / "nowhere"}, {"noir": 1.0}, tmp_path / "out")
    with pytest.raises(BlendError, match="watercolour"):
        blend_adapters(adapters, {"watercolour": 1.0}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_family_comes_from_the_adapters_metadata(adapters, tmp_path):
    import shutil

    from safetensors import safe_open

    from stunning.blend import BlendError
    from stunning.families import write_lora_metadata

    tagged = {}
    for style, family in (("impressionist", "sd-unet"), ("noir", "sd-unet"), ("sketch", "sdxl")):
        tagged[style] = tmp_path / style
        shutil.copytree(adapters[style], tagged[style])
        write_lora_metadata(tagged[style] / "pytorch_lora_weights.safetensors", {"family": family})
    blend_adapters(tagged, {"impressionist": 0.5, "noir": 0.5}, tmp_path / "mix")
    with safe_open(str(tmp_path / "mix" / "pytorch_lora_weights.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["stunning.family"] == "sd-unet" and meta["stunning.blend"] == "mix"
    with pytest.raises(BlendError, match="different model families"):
        blend_adapters(tagged, {"noir": 0.5, "sketch": 0.5}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
