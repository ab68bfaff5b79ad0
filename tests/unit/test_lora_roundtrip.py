"""A trained adapter is a plain diffusers LoRA: stock `load_lora_weights` loads it, it changes
the images, and it reproduces exactly what the trainer's own pipeline generated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from stunning.training.samples import SAMPLE_GUIDANCE, SAMPLE_STEPS, sample_prompt
from stunning.training.trainer import train_style
from tests.factories import make_grey_noir, tiny_train_config

SEEDS = [0, 1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd_unet):
    root = tmp_path_factory.mktemp("roundtrip")
    cfg = tiny_train_config(steps=10, batch_size=4, learning_rate=1e-2, checkpoint_every=10)
    summary = train_style(
        tiny_sd_unet,
        "sd-unet",
        make_grey_noir(root / "curated"),
        "noir",
        cfg,
        root / "adapters",
        None,
        None,
        "cpu",
        samples_dir=root / "samples",
        sample_seeds=SEEDS,
    )
    return {"cfg": cfg, "summary": summary, "adapter": root / "adapters" / "noir", "samples": root / "samples" / "noir"}


def _stock_images(base: Path, adapter: Path | None, prompt: str) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(base), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter))
    out = pipe(
        [prompt] * len(SEEDS),
        generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS],
        num_inference_steps=SAMPLE_STEPS,
        guidance_scale=SAMPLE_GUIDANCE,
        height=32,
        width=32,
        output_type="np",
    )
    return out.images


def test_adapter_file_is_in_the_diffusers_layout(trained):
    path = trained["adapter"] / "pytorch_lora_weights.safetensors"
    assert trained["summary"]["adapter"] == str(path)
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        assert keys and all(k.startswith("unet.") for k in keys)
        # Only the configured attention projections are adapted, each with a down/up pair.
        targets = {k.split(".lora")[0].rsplit(".", 1)[-1] for k in keys if "to_out" not in k}
        assert targets == {"to_q", "to_k", "to_v"} and any("to_out.0" in k for k in keys)
        ranks = {f.get_tensor(k).shape[0] for k in keys if "lora_A" in k or "lora.down" in k}
        assert ranks == {trained["cfg"].rank}
    assert (trained["adapter"] / "train_config.yaml").is_file()


def test_stock_diffusers_loads_the_adapter_and_it_changes_the_images(trained, tiny_sd_unet):
    prompt = sample_prompt(trained["cfg"], "noir")
    base_imgs = _stock_images(tiny_sd_unet, None, prompt)
    lora_imgs = _stock_images(tiny_sd_unet, trained["adapter"], prompt)
    assert lora_imgs.shape == (len(SEEDS), 32, 32, 3) and np.isfinite(lora_imgs).all()
    assert np.abs(lora_imgs - base_imgs).mean() > 2 / 255

    # The stock pipeline with the saved file gives what the trainer's pipeline generated
    # (same prompt, seeds, steps): nothing was lost in saving (ranks, alpha scaling, keys).
    for seed, img in zip(SEEDS, lora_imgs, strict=True):
        trainer_img = np.asarray(Image.open(trained["samples"] / f"seed-{seed}.png"), dtype=np.float32) / 255
        assert np.abs(trainer_img - img).max() <= 2 / 255, seed
