"""The `sdxl` family on a tiny, randomly initialised Stable Diffusion XL model built locally.

What SDXL adds over SD 1.x and what can break with it: two text encoders packed into one
conditioning tensor, size/crop time ids that must follow each batch's latent size (aspect
buckets), the epsilon/v objective by the scheduler config, adapters that stock
`StableDiffusionXLPipeline.load_lora_weights` reads, a float32 VAE under float16, and the
rest of the pipeline (trainer, fuse, quantize) running on it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from stunning.config import TrainConfig
from stunning.families import ModelNotFoundError, get_family
from stunning.families.sdxl import SAMPLERS, time_ids, unpack
from stunning.training.adapter import lora_config
from tests.factories import tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
PROMPTS = ["a red dress on a white background", "a blue hat on a grey background"]


@pytest.fixture
def fam():
    return get_family("sdxl")


def load(fam, base, dtype=torch.float32):
    pipe = fam.load_pipeline(base, CPU, dtype)
    for m in fam.frozen_modules(pipe):
        m.requires_grad_(False)
    return pipe


def stock(base):
    return StableDiffusionXLPipeline.from_pretrained(str(base), local_files_only=True, add_watermarker=False)


def batch(fam, pipe, h=32, w=32, n=4):
    latents = fam.encode_images(pipe, torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(7)) * 2 - 1,
                                torch.Generator().manual_seed(0))
    return latents, fam.encode_prompts(pipe, [PROMPTS[i % 2] for i in range(n)])


def train(fam, pipe, latents, cond, steps=30, scheduler=None, cfg=None):
    """Train a fresh adapter on a fixed batch (same noise each step); (loss before, loss after)."""
    torch.manual_seed(0)
    pipe.unet.add_adapter(lora_config(cfg or TrainConfig(rank=4, alpha=4, target_modules=fam.default_lora_targets)))
    opt = torch.optim.AdamW([p for p in pipe.unet.parameters() if p.requires_grad], lr=1e-2)

    def fixed_loss():
        return fam.training_loss(pipe, latents, cond, torch.Generator().manual_seed(1), scheduler=scheduler)

    before = float(fixed_loss().detach())
    for _ in range(steps):
        loss = fixed_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, float(fixed_loss().detach())


def pixels(images):
    return np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in images])


class TimeIds:
    """Records the latent shape and the SDXL time ids of every UNet call (a forward pre-hook)."""

    def __init__(self, unet):
        self.calls: list[tuple[tuple[int, ...], list[list[float]]]] = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.calls.append((tuple(sample.shape), kwargs["added_cond_kwargs"]["time_ids"].tolist()))


def test_tiny_model_has_the_sdxl_layout_and_packs_both_encoders(tiny_sdxl, fam):
    from stunning.model_source import detect_family
    from stunning.training.encoding import size_multiple

    assert detect_family(tiny_sdxl) == "sdxl"
    pipe = load(fam, tiny_sdxl)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert fam.resolution(pipe) == 32 and size_multiple(fam, pipe) == 4
    # The packed conditioning is exactly what the stock pipeline computes, split back losslessly.
    cond = fam.encode_prompts(pipe, PROMPTS)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, device=CPU, do_classifier_free_guidance=False)
    assert cond.shape == (2, embeds.shape[1] + 1, embeds.shape[2])
    got_embeds, got_pooled = unpack(pipe, cond)
    assert torch.equal(got_embeds, embeds) and torch.equal(got_pooled, pooled)
    assert not cond[:, -1, pooled.shape[-1]:].any()  # the pooled token's padding is zeros


def test_training_lowers_the_loss_and_stock_sdxl_loads_the_same_adapter(tiny_sdxl, fam, tmp_path):
    from safetensors import safe_open

    pipe = load(fam, tiny_sdxl)
    before, after = train(fam, pipe, *batch(fam, pipe))
    assert after < 0.9 * before, (before, after)

    path = fam.save_lora(pipe, tmp_path / "lora", metadata={"family": "sdxl"})
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata()["stunning.family"] == "sdxl"
    assert keys and all(k.startswith("unet.") for k in keys)
    plain = stock(tiny_sdxl)
    base_image = fam.generate(plain, ["a red dress"], [0], steps=3, guidance_scale=4.0)[0]
    plain.load_lora_weights(str(tmp_path / "lora"))  # stock diffusers, no project code
    assert any("lora" in n for n, _ in plain.unet.named_modules())
    # The stock pipeline with the file generates what the trained pipeline generates.
    ours = fam.generate(pipe, ["a red dress"], [0], steps=3, guidance_scale=4.0)[0]
    theirs = fam.generate(plain, ["a red dress"], [0], steps=3, guidance_scale=4.0)[0]
    assert np.abs(pixels([ours]) - pixels([theirs])).max() <= 2 / 255
    assert np.abs(pixels([ours]) - pixels([base_image])).mean() > 1 / 255  # and the adapter does something
    out = plain("a red dress", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np", height=32, width=32)
    assert out.images.shape == (1, 32, 32, 3)


def test_generation_is_seeded_and_is_what_the_stock_pipeline_draws(tiny_sdxl, fam):
    pipe = load(fam, tiny_sdxl)
    a = fam.generate(pipe, ["a blue hat", "a red dress"], [3, 4], steps=3, guidance_scale=4.0)
    b = fam.generate(pipe, ["a blue hat", "a red dress"], [3, 4], steps=3, guidance_scale=4.0)
    c = fam.generate(pipe, ["a blue hat"], [5], steps=3, guidance_scale=4.0)
    assert [im.size for im in a] == [(32, 32), (32, 32)]
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    assert a[0].tobytes() != c[0].tobytes()
    # One generator per image: an image does not depend on what else is in the batch.
    alone = fam.generate(pipe, ["a red dress"], [4], steps=3, guidance_scale=4.0)[0]
    assert np.abs(pixels([alone]) - pixels([a[1]])).max() <= 1 / 255
    ref = stock(tiny_sdxl)(["a blue hat"], generator=[torch.Generator().manual_seed(3)], num_inference_steps=3,
                      guidance_scale=4.0, height=32, width=32, output_type="pil").images[0]
    assert ref.tobytes() == a[0].tobytes()


def test_half_precision_keeps_the_vae_float32_and_still_generates(tiny_sdxl, fam):
    """float16 (MPS on an M1, CUDA without bf16): the VAE stays float32 and decoding works."""
    half = load(fam, tiny_sdxl, torch.float16)
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32
    img = fam.generate(half, ["a blue hat"], [3], steps=3, guidance_scale=4.0)[0]
    assert half.vae.dtype == torch.float32  # not cast down by the pipeline
    full = fam.generate(load(fam, tiny_sdxl), ["a blue hat"], [3], steps=3, guidance_scale=4.0)[0]
    assert img.size == (32, 32) and np.abs(pixels([img]) - pixels([full])).mean() < 4 / 255
    latents, cond = batch(fam, half, n=2)
    assert latents.dtype == torch.float32  # encoded by the float32 VAE
    with torch.autocast("cpu", dtype=torch.float16):
        loss = fam.training_loss(half, latents, cond.half(), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_missing_or_incomplete_model_folder_says_what_and_how(tiny_sdxl, fam, tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"nowhere does not exist.*base\.path"):
        fam.load_pipeline(tmp_path / "nowhere", CPU, torch.float32)
    half = tmp_path / "no-second-encoder"
    shutil.copytree(tiny_sdxl, half, ignore=shutil.ignore_patterns("text_encoder_2", "tokenizer_2"))
    with pytest.raises(ModelNotFoundError, match=r"lacks the component folder\(s\) \['text_encoder_2', 'tokenizer_2'\]"):
        fam.load_pipeline(half, CPU, torch.float32)


@pytest.mark.parametrize("block", ["down_blocks.1", "mid_block", "up_blocks.0"])
def test_block_wise_targets_adapt_only_that_block(tiny_sdxl, fam, block, tmp_path):
    pipe = load(fam, tiny_sdxl)
    cfg = tiny_train_config(target_modules=fam.default_lora_targets, target_blocks=[block])
    pipe.unet.add_adapter(lora_config(cfg))
    adapted = {n.split(".lora_A")[0] for n, _ in pipe.unet.named_parameters() if ".lora_A" in n}
    expected = {n for n, _ in pipe.unet.named_modules()
                if n.startswith(block + ".") and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")
                or n.startswith(block + ".") and n.endswith(".to_out.0")}
    assert expected and adapted == expected
    fam.save_lora(pipe, tmp_path / "lora")
    plain = stock(tiny_sdxl)
    plain.load_lora_weights(str(tmp_path / "lora"))
    loaded = {n.split(".lora_A")[0] for n, _ in plain.unet.named_parameters() if ".lora_A" in n}
    assert loaded == expected


def test_non_square_latents_train_with_their_own_time_ids(tiny_sdxl, fam):
    pipe = load(fam, tiny_sdxl)
    latents, cond = batch(fam, pipe, h=32, w=48, n=2)
    assert latents.shape[-2:] == (16, 24)
    rec = TimeIds(pipe.unet)
    before, after = train(fam, pipe, latents, cond, steps=10)
    assert after < before
    assert rec.calls and all(ids == [[32.0, 48.0, 0.0, 0.0, 32.0, 48.0]] * 2 for _, ids in rec.calls)
    # The same ids the stock pipeline passes when it samples at 32x48 (cond and uncond rows).
    rec.calls.clear()
    pipe(["a red dress"], num_inference_steps=1, height=32, width=48, output_type="latent")
    assert rec.calls[0][0][-2:] == (16, 24) and rec.calls[0][1] == [[32.0, 48.0, 0.0, 0.0, 32.0, 48.0]] * 2
    assert time_ids(torch.zeros(3, 4, 24, 16), 8).tolist() == [[192.0, 128.0, 0.0, 0.0, 192.0, 128.0]] * 3


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_is_the_ddpm_objective_of_the_model_scheduler(tiny_sdxl, fam, tmp_path, prediction_type):
    """The loss equals an independent computation of Ho et al. (epsilon) / Salimans & Ho (v)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_sdxl, model)
    sched_file = model / "scheduler" / "scheduler_config.json"
    sched_file.write_text(json.dumps({**json.loads(sched_file.read_text()), "prediction_type": prediction_type}))
    pipe = load(fam, model)
    scheduler = fam.noise_scheduler(pipe)
    assert scheduler.config.prediction_type == prediction_type
    latents, cond = batch(fam, pipe, n=2)

    g = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (2,), generator=g)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, device=CPU, do_classifier_free_guidance=False)
    ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim).repeat(2, 1)
    with torch.no_grad():
        pred = pipe.unet(noisy, t, encoder_hidden_states=embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        expected = torch.nn.functional.mse_loss(pred, target)
        got = fam.training_loss(pipe, latents, cond, torch.Generator().manual_seed(5))
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    # ...and a model of either kind trains.
    before, after = train(fam, pipe, latents, cond, steps=10, scheduler=scheduler)
    assert after < 0.95 * before, (before, after)


def test_samplers_keep_the_model_prediction_type(tiny_sdxl, fam):
    pipe = load(fam, tiny_sdxl)
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    images = {}
    for sampler in SAMPLERS:
        fam.set_sampler(pipe, sampler)
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        images[sampler] = fam.generate(pipe, ["a red dress"], [0], steps=3, guidance_scale=4.0)[0].tobytes()
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert len(set(images.values())) == len(SAMPLERS)  # three different samplers really ran
    with pytest.raises(ValueError, match="unknown sampler 'heun-9000'"):
        fam.set_sampler(pipe, "heun-9000")


def test_the_trainer_trains_sdxl_on_aspect_buckets(tiny_sdxl, fam, tmp_path):
    """`train_style` end to end on a bucketed set: every batch gets the time ids of its own size."""
    from safetensors import safe_open

    from stunning.training.trainer import train_style
    from tests.factories import make_bucketed

    curated = make_bucketed(tmp_path / "curated")
    seen: list[tuple[tuple[int, ...], list[list[float]]]] = []

    class Recording:  # the real family; records each UNet call of the run's pipeline
        def __getattr__(self, attr):
            return getattr(fam, attr)

        def load_pipeline(self, path, device, dtype):
            pipe = fam.load_pipeline(path, device, dtype)
            seen_hook = TimeIds(pipe.unet)
            seen_hook.calls = seen
            return pipe

    cfg = tiny_train_config(steps=6, batch_size=2, learning_rate=5e-3, target_modules=fam.default_lora_targets,
                      caption_dropout=0.2)
    summary = train_style(tiny_sdxl, Recording(), curated, "noir", cfg, tmp_path / "out", None, None, device="cpu",
                          sample_seeds=[0], samples_dir=tmp_path / "samples")
    assert summary["steps"] == 6 and summary["val_loss"] is not None
    sizes = {shape[-2:] for shape, _ in seen}
    assert {(12, 20), (20, 12)} & sizes  # non-square buckets were trained...
    for shape, ids in seen:  # ...each with its own size ids (2 px per latent in the tiny VAE)
        h, w = shape[-2] * 2, shape[-1] * 2
        assert all(row == [h, w, 0, 0, h, w] for row in ids), (shape, ids)
    with safe_open(summary["adapter"], framework="pt") as f:
        assert f.metadata()["stunning.family"] == "sdxl"
    assert len(list((tmp_path / "samples" / "noir").glob("*.png"))) == 1
    plain = stock(tiny_sdxl)
    plain.load_lora_weights(str(tmp_path / "out" / "noir"))


def test_fused_and_quantized_sdxl_load_and_generate(tiny_sdxl, fam, tmp_path):
    """The merge phase on SDXL: fuse the adapter into a stock-loadable folder, quantize its UNet."""
    from stunning.blend import fuse
    from stunning.quantize import load_quantized, quantize_denoiser

    pipe = load(fam, tiny_sdxl)
    train(fam, pipe, *batch(fam, pipe, n=2), steps=3)
    fam.save_lora(pipe, tmp_path / "lora")
    with_lora = fam.generate(pipe, ["a red dress"], [0], steps=3, guidance_scale=4.0)
    fused = fuse(tiny_sdxl, fam, tmp_path / "lora", tmp_path / "fused")
    plain = stock(fused)
    assert not any("lora" in n for n, _ in plain.unet.named_modules())
    got = fam.generate(plain, ["a red dress"], [0], steps=3, guidance_scale=4.0)
    assert np.abs(pixels(got) - pixels(with_lora)).max() <= 2 / 255
    result = quantize_denoiser(fused, fam, tmp_path / "int8")
    assert result.quantized_bytes < result.fp32_bytes
    quantized = load_quantized(fused, tmp_path / "int8")
    img = fam.generate(quantized, ["a red dress"], [0], steps=3, guidance_scale=4.0)[0]
    assert img.size == (32, 32)


def test_vae_latent_statistics_are_undone_by_decoding(tiny_sdxl, fam):
    """A VAE whose config gives per-channel latent mean/std (as the stock pipeline reads them):
    encoding normalises with them and :func:`decode` undoes it exactly."""
    from stunning.families import image_moments
    from stunning.families.sdxl import decode

    pipe = load(fam, tiny_sdxl)
    mean, std = image_moments(pipe, torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    plain = decode(pipe, fam.latents_from_moments(pipe, mean, torch.zeros_like(std), None))
    pipe.vae.register_to_config(latents_mean=[0.5, -0.2, 0.1, 0.0], latents_std=[2.0, 0.5, 1.0, 3.0])
    latents = fam.latents_from_moments(pipe, mean, torch.zeros_like(std), None)
    assert torch.allclose(latents[0, 0], (mean[0, 0] - 0.5) / 2.0 * pipe.vae.config.scaling_factor)
    assert np.abs(pixels(decode(pipe, latents)) - pixels(plain)).max() <= 1 / 255
