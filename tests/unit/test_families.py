"""Every model family, on a tiny configuration of its real diffusers classes built locally.

For each family: a few training steps lower the loss on a fixed batch, the adapter saves in
the family's diffusers LoRA layout, the *stock* pipeline class loads it with
`load_lora_weights` (no project code), and generates.
"""

from __future__ import annotations

import pytest
import torch

from stunning.families import ModelNotFoundError, available, get_family

FAMILIES = ["sd3", "sd-unet", "sdxl", "flux"]
TINY = {"sd3": "tiny_base", "sd-unet": "tiny_sd_unet", "sdxl": "tiny_sdxl", "flux": "tiny_flux"}


@pytest.fixture(params=FAMILIES)
def family_base(request):
    return request.param, request.getfixturevalue(TINY[request.param])


def test_builtin_families_are_registered():
    assert set(FAMILIES) <= set(available())


def test_a_training_step_lowers_the_loss_and_the_adapter_round_trips(family_base, tmp_path, one_torch_thread,
                                                                     fixed_batch_losses):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    name, base = family_base
    fam = get_family(name)
    pipe = fam.load_pipeline(base, torch.device("cpu"), torch.float32)
    for m in fam.frozen_modules(pipe):
        m.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    latents = fam.encode_images(pipe, torch.rand(4, 3, 32, 32) * 2 - 1, gen)
    cond = fam.encode_prompts(pipe, ["a red dress on a white background"] * 2 + ["a blue hat on a grey background"] * 2)
    denoiser = fam.denoiser(pipe)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=fam.default_lora_targets, init_lora_weights="gaussian"))
    before, after = fixed_batch_losses(fam, pipe, latents, cond, steps=30)
    assert after < 0.9 * before, (before, after)

    path = fam.save_lora(pipe, tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors" and path.is_file()
    absent = {  # SD3 without T5, as documented; SDXL without the optional watermark package
        "sd3": {"text_encoder_3": None, "tokenizer_3": None}, "sdxl": {"add_watermarker": False},
    }.get(name, {})
    stock = fam.pipeline_class().from_pretrained(str(base), local_files_only=True, **absent)
    stock.load_lora_weights(str(tmp_path / "lora"), adapter_name="style")
    # Every trained tensor arrives, unchanged: stock loaders skip keys they do not know with
    # only a warning (sd3/flux once dropped every attention layer that way).
    trained = get_peft_model_state_dict(denoiser)
    loaded = get_peft_model_state_dict(getattr(stock, fam.lora_component), adapter_name="style")
    assert sorted(loaded) == sorted(trained) and len(trained) > 0
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value, msg=key)
    kwargs = {"sd3": {"max_sequence_length": 0}, "flux": {"max_sequence_length": 16}}.get(name, {})
    out = stock("a red dress", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                height=32, width=32, **kwargs)
    assert out.images.shape == (1, 32, 32, 3)


def test_generation_is_seeded(family_base, one_torch_thread):
    name, base = family_base
    fam = get_family(name)
    pipe = fam.load_pipeline(base, torch.device("cpu"), torch.float32)
    a = fam.generate(pipe, ["a blue hat"], [3], steps=3, guidance_scale=4.0)[0]
    b = fam.generate(pipe, ["a blue hat"], [3], steps=3, guidance_scale=4.0)[0]
    c = fam.generate(pipe, ["a blue hat"], [4], steps=3, guidance_scale=4.0)[0]
    assert a.size == (32, 32)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


@pytest.mark.parametrize("sampler", ["euler", "euler-ancestral", "dpm++"])
def test_sd3_samplers_and_tiled_decoding(tiny_base, sampler, one_torch_thread):
    fam = get_family("sd3")
    pipe = fam.load_pipeline(tiny_base, torch.device("cpu"), torch.float32)
    fam.set_sampler(pipe, sampler)
    img = fam.generate(pipe, ["a red dress"], [0], steps=4, guidance_scale=3.0, tiled_vae=True)[0]
    assert img.size == (32, 32)
    with pytest.raises(ValueError, match="unknown sampler"):
        fam.set_sampler(pipe, "heun-9000")


@pytest.mark.parametrize("name", FAMILIES)
def test_missing_model_names_the_folder_and_the_fix(name, tmp_path):
    fam = get_family(name)
    with pytest.raises(ModelNotFoundError, match="does not exist.*base.path"):
        fam.load_pipeline(tmp_path / "nowhere", torch.device("cpu"), torch.float32)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="lacks the component"):
        fam.load_pipeline(tmp_path / "half", torch.device("cpu"), torch.float32)


def test_block_wise_targets_and_adapter_metadata(tiny_base, tmp_path, one_torch_thread):
    import json

    from safetensors import safe_open

    from stunning.training.adapter import lora_config
    from tests.factories import tiny_train_config

    fam = get_family("sd3")
    pipe = fam.load_pipeline(tiny_base, torch.device("cpu"), torch.float32)
    cfg = tiny_train_config(target_modules=["to_q", "to_v"], target_blocks=["transformer_blocks.1"], trigger_words=["sks"])
    pipe.transformer.add_adapter(lora_config(cfg))
    adapted = {n.split(".lora_A")[0] for n, _ in pipe.transformer.named_parameters() if ".lora_A" in n}
    assert adapted == {"transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.to_v"}

    path = fam.save_lora(pipe, tmp_path / "lora", metadata={"rank": 4, "trigger_words": ["sks"], "base_model": "micro"})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["stunning.rank"] == "4" and json.loads(meta["stunning.trigger_words"]) == ["sks"]
    assert meta["stunning.base_model"] == "micro"
    assert "lora_adapter_metadata" in meta  # diffusers' own entry (the LoraConfig) is kept
    stock = fam.pipeline_class().from_pretrained(str(tiny_base), text_encoder_3=None, tokenizer_3=None)
    stock.load_lora_weights(str(tmp_path / "lora"))  # still a plain diffusers LoRA file


def test_the_trainer_trains_and_resumes_every_family(family_base, tmp_path, one_torch_thread):
    """`train_style` (the pipeline's trainer) on each family: adapter saved, val loss measured."""
    from safetensors import safe_open

    from stunning.training.trainer import train_style
    from tests.factories import make_curated, tiny_train_config

    name, base = family_base
    fam = get_family(name)
    curated = make_curated(tmp_path / "curated", n_train=4, n_val=2)
    cfg = tiny_train_config(steps=4, batch_size=2, checkpoint_every=2, learning_rate=5e-3,
                      target_modules=fam.default_lora_targets, caption_dropout=0.2)

    def crash_at_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train_style(base, name, curated, "noir", cfg, tmp_path / "out", None, tmp_path / "ckpt", device="cpu",
                    sample_seeds=[], on_step=crash_at_3)
    summary = train_style(base, name, curated, "noir", cfg, tmp_path / "out", None, tmp_path / "ckpt",
                          device="cpu", sample_seeds=[0], samples_dir=tmp_path / "samples")
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4 and summary["val_loss"] is not None
    with safe_open(summary["adapter"], framework="pt") as f:
        assert f.metadata()["stunning.family"] == name
    assert len(list((tmp_path / "samples" / "noir").glob("*.png"))) == 1

def test_sdxl_size_conditioning_follows_the_latent_shape(tiny_sdxl, one_torch_thread):
    from stunning.families.sdxl import time_ids

    fam = get_family("sdxl")
    pipe = fam.load_pipeline(tiny_sdxl, torch.device("cpu"), torch.float32)
    ids = time_ids(torch.zeros(2, 4, 4, 6), pipe.vae_scale_factor)
    assert ids.tolist() == [[8.0, 12.0, 0.0, 0.0, 8.0, 12.0]] * 2  # (h, w, crop, target) in pixels
    # The stock pipeline gives the same ids when it samples at that size.
    stock = pipe._get_add_time_ids((8, 12), (0, 0), (8, 12), dtype=torch.float32,
                                   text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert stock[0].tolist() == ids[0].tolist()
    # Non-square latents (an aspect-ratio bucket, 32x48 px) train.
    wide = fam.encode_images(pipe, torch.rand(2, 3, 32, 48) * 2 - 1, torch.Generator().manual_seed(0))
    cond = fam.encode_prompts(pipe, ["a red dress", "a blue hat"])
    assert wide.shape[-2:] == (16, 24)
    loss = fam.training_loss(pipe, wide, cond, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_sdxl_v_prediction_target(tiny_sdxl, one_torch_thread):
    """With a v-prediction scheduler the target is the velocity, not the noise."""
    from diffusers import DDPMScheduler

    fam = get_family("sdxl")
    pipe = fam.load_pipeline(tiny_sdxl, torch.device("cpu"), torch.float32)
    latents = fam.encode_images(pipe, torch.rand(2, 3, 32, 32) * 2 - 1, torch.Generator().manual_seed(0))
    cond = fam.encode_prompts(pipe, ["a red dress"] * 2)
    eps = fam.noise_scheduler(pipe)
    v = DDPMScheduler.from_config(eps.config, prediction_type="v_prediction")
    loss_eps = fam.training_loss(pipe, latents, cond, torch.Generator().manual_seed(0), scheduler=eps)
    loss_v = fam.training_loss(pipe, latents, cond, torch.Generator().manual_seed(0), scheduler=v)
    assert torch.isfinite(loss_v) and float(loss_v) != pytest.approx(float(loss_eps))
    bad = DDPMScheduler.from_config(eps.config, prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type"):
        fam.training_loss(pipe, latents, cond, torch.Generator().manual_seed(0), scheduler=bad)


@pytest.mark.parametrize(("name", "block", "prefix"), [
    ("sdxl", "down_blocks.1", "down_blocks.1."),
    ("sd-unet", "up_blocks.0", "up_blocks.0."),
])
def test_unet_block_wise_targets(name, block, prefix, request, one_torch_thread):
    from stunning.training.adapter import lora_config
    from tests.factories import tiny_train_config

    fam = get_family(name)
    pipe = fam.load_pipeline(request.getfixturevalue(TINY[name]), torch.device("cpu"), torch.float32)
    pipe.unet.add_adapter(lora_config(tiny_train_config(target_modules=["to_q"], target_blocks=[block])))
    adapted = {n.split(".lora_A")[0] for n, _ in pipe.unet.named_parameters() if ".lora_A" in n}
    assert adapted and all(a.startswith(prefix) and a.endswith("to_q") for a in adapted)


def test_flux_packs_latents_shifts_sigmas_and_feeds_guidance(tiny_flux, tiny_flux_schnell, one_torch_thread):
    from stunning.families.flux import shift_sigmas

    fam = get_family("flux")
    pipe = fam.load_pipeline(tiny_flux, torch.device("cpu"), torch.float32)
    assert fam.resolution(pipe) == 32 and fam.t5_tokens(pipe) == 16  # from the folder's stunning.json
    cond = fam.encode_prompts(pipe, ["a red dress", "a blue hat"])
    assert cond.shape == (2, 16 + 1, pipe.transformer.config.joint_attention_dim)  # T5 tokens + pooled token
    # Non-square latents (a 32x48 px bucket) pack into 8x12 patches and train; odd sizes are refused.
    wide = fam.encode_images(pipe, torch.rand(2, 3, 32, 48) * 2 - 1, torch.Generator().manual_seed(0))
    assert torch.isfinite(fam.training_loss(pipe, wide, cond, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="even"):
        fam.training_loss(pipe, torch.zeros(2, 4, 15, 16), cond, torch.Generator().manual_seed(0))
    # Dynamic shifting: longer sequences (bigger images) are trained at higher noise levels.
    s = torch.tensor([0.25, 0.5, 0.75])
    small, big = shift_sigmas(s, pipe.scheduler.config, 64), shift_sigmas(s, pipe.scheduler.config, 1024)
    assert torch.all(big > small) and torch.all((small > 0) & (big < 1))
    assert torch.allclose(shift_sigmas(s, {"shift": 1.0}, 64), s)
    # Guidance embedding: the trained constant changes the prediction on a guidance-distilled model...
    lat = wide[:, :, :16, :16]
    a = fam.training_loss(pipe, lat, cond, torch.Generator().manual_seed(0))
    fam.train_guidance = 4.0
    try:
        b = fam.training_loss(pipe, lat, cond, torch.Generator().manual_seed(0))
    finally:
        fam.train_guidance = 1.0
    assert float(a) != pytest.approx(float(b))
    # ...and a model without one (schnell layout) trains and samples without it.
    pipe2 = fam.load_pipeline(tiny_flux_schnell, torch.device("cpu"), torch.float32)
    assert not pipe2.transformer.config.guidance_embeds
    assert torch.isfinite(fam.training_loss(pipe2, lat, cond, torch.Generator().manual_seed(0)))
    assert fam.generate(pipe2, ["a red dress"], [0], steps=2, guidance_scale=3.5)[0].size == (32, 32)


@pytest.mark.parametrize("block", ["transformer_blocks.0", "single_transformer_blocks.0"])
def test_flux_block_wise_targets(tiny_flux, block, one_torch_thread):
    from stunning.training.adapter import lora_config
    from tests.factories import tiny_train_config

    fam = get_family("flux")
    pipe = fam.load_pipeline(tiny_flux, torch.device("cpu"), torch.float32)
    pipe.transformer.add_adapter(lora_config(tiny_train_config(target_modules=["to_q", "proj_out"], target_blocks=[block])))
    adapted = {n.split(".lora_A")[0] for n, _ in pipe.transformer.named_parameters() if ".lora_A" in n}
    assert adapted and all(a.startswith(block + ".") for a in adapted), adapted
