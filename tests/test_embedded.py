"""The embedded base model: a real diffusers layout that the stock pipeline class loads."""

from __future__ import annotations

import pytest
import torch

from stunning.embedded import build_tokenizer
from stunning.families import ModelNotFoundError, get_family


def test_tokenizer_keeps_caption_words_whole():
    tok = build_tokenizer()
    assert len(tok) > 100  # not the 2-token vocabulary a file-based CLIPTokenizer would build
    assert tok.tokenize("a red dress, noir style") == ["a</w>", "red</w>", "dress</w>", ",</w>", "noir</w>", "style</w>"]
    ids = tok("zebra", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == tok.model_max_length and tok.unk_token_id not in ids[1:3]


def test_stock_pipeline_loads_and_generates(tiny_base):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, local_files_only=True)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    out = pipe("a red dress", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


def test_family_generation_is_seeded(tiny_base):
    fam = get_family("sd-unet")
    pipe = fam.load_pipeline(tiny_base, torch.device("cpu"), torch.float32)
    a = fam.generate(pipe, ["a blue hat"], [3], steps=3, guidance_scale=4.0)[0]
    b = fam.generate(pipe, ["a blue hat"], [3], steps=3, guidance_scale=4.0)[0]
    c = fam.generate(pipe, ["a blue hat"], [4], steps=3, guidance_scale=4.0)[0]
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_missing_model_names_the_folder_and_the_fix(tmp_path):
    fam = get_family("sd-unet")
    with pytest.raises(ModelNotFoundError, match="does not exist.*base.path"):
        fam.load_pipeline(tmp_path / "nowhere", torch.device("cpu"), torch.float32)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="lacks the component"):
        fam.load_pipeline(tmp_path / "half", torch.device("cpu"), torch.float32)


def test_training_loss_is_finite_and_differentiable(tiny_base):
    fam = get_family("sd-unet")
    pipe = fam.load_pipeline(tiny_base, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    latents = fam.encode_images(pipe, torch.rand(2, 3, 32, 32) * 2 - 1, gen)
    cond = fam.encode_prompts(pipe, ["a red dress", "a blue hat"])
    loss = fam.training_loss(pipe, latents, cond, gen)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in pipe.unet.parameters())


def test_pretraining_makes_a_working_autoencoder(tmp_path):
    """A few steps of pretraining already beat the random VAE's reconstruction by far."""
    from stunning import pretrain
    from stunning.families import get_family

    path = tmp_path / "pre"
    from stunning.embedded import build_embedded

    build_embedded(path, seed=0, vae_steps=60, unet_steps=5, n_images=32)
    pipe = get_family("sd-unet").load_pipeline(path, torch.device("cpu"), torch.float32)
    pixels, captions = pretrain.world_images(16, seed=1, resolution=32)
    assert all("style" not in c for c in captions)  # the base never sees style words
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample
    mse = float(((recon - pixels) / 2).pow(2).mean())
    assert mse < 0.05, mse
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the pretrained latents


def test_builds_are_reproducible(tmp_path):
    """Same seed, same weights: the DAG's base_model stage must not change between runs."""
    from stunning.embedded import build_embedded

    def digest(path):
        import hashlib

        return {
            p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))
            if p.is_file()
        }

    a = build_embedded(tmp_path / "a", seed=0, vae_steps=10, unet_steps=10, n_images=16)
    b = build_embedded(tmp_path / "b", seed=0, vae_steps=10, unet_steps=10, n_images=16)
    assert digest(a) == digest(b)
