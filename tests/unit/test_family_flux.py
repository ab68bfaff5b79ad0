"""The FLUX.1 family on a tiny, randomly initialised FluxPipeline built locally (no downloads).

What is checked: prompt packing (T5 tokens + pooled CLIP vector), 2x2 latent packing against
the stock pipeline's own sampling layout (non-square sizes too), the sigma shift against the
stock scheduler, the guidance embedding (FLUX.1-dev layout) and its absence (schnell layout),
training lowers the loss on a fixed batch, the adapter loads *completely* in the stock
`FluxPipeline` and reproduces the trained model, block-wise targets, samplers, seeded
generation, missing-model errors, the real trainer (`train_style`), and the rest of the
pipeline (blend, fuse, quantize) on FLUX adapters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from stunning.families import ModelNotFoundError, get_family

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a red dress on a white background"] * 2 + ["a blue hat on a grey background"] * 2


@pytest.fixture
def fam():
    return get_family("flux")


def load(base):
    pipe = get_family("flux").load_pipeline(base, torch.device("cpu"), torch.float32)
    for m in get_family("flux").frozen_modules(pipe):
        m.requires_grad_(False)
    return pipe


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def trained(tiny_flux, tmp_path_factory, fixed_batch_losses):
    """15 steps on a fixed batch with the default targets; the adapter saved. (pipe, losses, dir)"""
    from peft import LoraConfig

    fam = get_family("flux")
    pipe = load(tiny_flux)
    gen = torch.Generator().manual_seed(0)
    latents = fam.encode_images(pipe, torch.rand(4, 3, 32, 32) * 2 - 1, gen)
    cond = fam.encode_prompts(pipe, PROMPTS)
    torch.manual_seed(0)
    pipe.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=fam.default_lora_targets, init_lora_weights="gaussian")
    )
    before, after = fixed_batch_losses(fam, pipe, latents, cond)
    out = tmp_path_factory.mktemp("flux-lora") / "lora"
    fam.save_lora(pipe, out, metadata={"family": "flux"})
    return pipe, (before, after), out


def test_registered_with_its_stock_pipeline(fam):
    from diffusers import FluxPipeline

    assert fam.name == "flux" and fam.pipeline_class() is FluxPipeline and fam.lora_component == "transformer"


def test_prompts_pack_t5_tokens_and_the_pooled_clip_vector(tiny_flux, fam):
    from transformers import T5TokenizerFast

    pipe = load(tiny_flux)
    # The local T5 tokenizer survived save_pretrained/from_pretrained: known words, no <unk>.
    assert isinstance(pipe.tokenizer_2, T5TokenizerFast)
    ids = pipe.tokenizer_2("a red dress").input_ids
    assert ids[-1] == pipe.tokenizer_2.eos_token_id and pipe.tokenizer_2.unk_token_id not in ids and len(ids) == 4
    assert fam.t5_tokens(pipe) == 16 and fam.resolution(pipe) == 32  # from the folder's stunning.json

    cond = fam.encode_prompts(pipe, ["a red dress", "a blue hat"])
    embeds, pooled, _ = pipe.encode_prompt(["a red dress", "a blue hat"], None, max_sequence_length=16)
    pooled_dim = pipe.transformer.config.pooled_projection_dim
    assert cond.shape == (2, 16 + 1, pipe.transformer.config.joint_attention_dim)
    assert torch.equal(cond[:, :-1], embeds)  # T5 per-token states
    assert torch.equal(cond[:, -1, :pooled_dim], pooled)  # CLIP's pooled vector, as one extra token
    assert not cond[:, -1, pooled_dim:].any()  # zero-padded
    assert not torch.equal(cond[0], cond[1])
    from stunning.families.flux import unpack

    e, p = unpack(pipe, cond)
    assert torch.equal(e, embeds) and torch.equal(p, pooled)


@pytest.mark.parametrize(("h", "w"), [(32, 32), (32, 48), (48, 32)])
def test_latent_packing_is_the_stock_sampling_layout(tiny_flux, h, w):
    """Training packs 4-D latents exactly as FluxPipeline.prepare_latents does for that size."""
    from stunning.families.flux import pack_latents, unpack_latents

    pipe = load(tiny_flux)
    c = pipe.transformer.config.in_channels // 4
    stock, stock_ids = pipe.prepare_latents(2, c, h, w, torch.float32, torch.device("cpu"),
                                            torch.Generator().manual_seed(5))
    lat_h, lat_w = h // pipe.vae_scale_factor, w // pipe.vae_scale_factor
    latents = torch.randn((2, c, lat_h, lat_w), generator=torch.Generator().manual_seed(5))
    packed, ids = pack_latents(latents)
    assert torch.equal(packed, stock) and torch.equal(ids, stock_ids)
    assert packed.shape == (2, (lat_h // 2) * (lat_w // 2), 4 * c)
    assert torch.equal(unpack_latents(packed, lat_h, lat_w), latents)
    assert torch.equal(unpack_latents(packed, lat_h, lat_w),
                       pipe._unpack_latents(packed, h, w, pipe.vae_scale_factor))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, c, 15, 16))


def test_sigma_shift_matches_the_stock_scheduler(tiny_flux):
    """Training sigmas are shifted by the same resolution-dependent mu the sampler uses."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from stunning.families.flux import shift_sigmas

    pipe = load(tiny_flux)
    cfg = pipe.scheduler.config
    assert cfg.use_dynamic_shifting
    s = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.1], dtype=torch.float64)
    for seq_len in (64, 96, 1024):  # 32x32 px, 32x48 px (an aspect bucket), big
        mu = calculate_shift(seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
        for kind in ("exponential", "linear"):
            sched = FlowMatchEulerDiscreteScheduler.from_config(cfg, time_shift_type=kind)
            sched.set_timesteps(sigmas=s.numpy(), mu=mu)
            ours = shift_sigmas(s, sched.config, seq_len)
            assert np.allclose(ours.numpy(), sched.sigmas[:-1].double().numpy(), atol=1e-6), (seq_len, kind)
    small, big = shift_sigmas(s, cfg, 64), shift_sigmas(s, cfg, 1024)
    assert torch.all(big > small)  # bigger images train at higher noise levels
    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    static.set_timesteps(sigmas=s.numpy())
    assert np.allclose(shift_sigmas(s, static.config, 64).numpy(), static.sigmas[:-1].double().numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="time_shift_type"):
        shift_sigmas(s, {**cfg, "time_shift_type": "cubic"}, 64)


class _Probe:
    """Records what the transformer's timestep/guidance embedding receives."""

    def __init__(self, transformer):
        self.calls = []
        self.handle = transformer.time_text_embed.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls.append([a.detach().clone() for a in args])


def test_guidance_embedding_gets_the_constant_training_guidance(tiny_flux, fam, monkeypatch):
    pipe = load(tiny_flux)
    assert pipe.transformer.config.guidance_embeds and type(fam).train_guidance == 1.0
    latents = fam.encode_images(pipe, torch.rand(2, 3, 32, 32) * 2 - 1, torch.Generator().manual_seed(0))
    cond = fam.encode_prompts(pipe, ["a red dress", "a blue hat"])
    probe = _Probe(pipe.transformer)
    with torch.no_grad():
        a = fam.training_loss(pipe, latents, cond, torch.Generator().manual_seed(0))
        monkeypatch.setattr(fam, "train_guidance", 4.0)
        b = fam.training_loss(pipe, latents, cond, torch.Generator().manual_seed(0))
    probe.handle.remove()
    (t1, g1, _), (t2, g2, _) = probe.calls
    assert torch.all(g1 == 1000.0) and torch.all(g2 == 4000.0)  # the transformer scales guidance by 1000
    assert torch.equal(t1, t2) and torch.all((t1 > 0) & (t1 < 1000))  # same sigmas, in (0, 1) x 1000
    assert float(a) != pytest.approx(float(b))


def test_a_model_without_guidance_embedding_trains_and_samples(tiny_flux_schnell, fam):
    from peft import LoraConfig

    pipe = load(tiny_flux_schnell)
    assert not pipe.transformer.config.guidance_embeds
    latents = fam.encode_images(pipe, torch.rand(2, 3, 32, 32) * 2 - 1, torch.Generator().manual_seed(0))
    cond = fam.encode_prompts(pipe, ["a red dress", "a blue hat"])
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=fam.default_lora_targets))
    probe = _Probe(pipe.transformer)
    loss = fam.training_loss(pipe, latents, cond, torch.Generator().manual_seed(0))
    probe.handle.remove()
    loss.backward()
    assert len(probe.calls[0]) == 2  # (timestep, pooled): no guidance
    assert all(p.grad is not None for n, p in lora_params(pipe.transformer).items() if "lora_A" in n)
    assert fam.generate(pipe, ["a red dress"], [0], steps=2, guidance_scale=3.5)[0].size == (32, 32)


def test_non_square_latents_train(tiny_flux, fam):
    from peft import LoraConfig

    pipe = load(tiny_flux)
    wide = fam.encode_images(pipe, torch.rand(2, 3, 32, 48) * 2 - 1, torch.Generator().manual_seed(0))
    assert wide.shape == (2, pipe.transformer.config.in_channels // 4, 16, 24)
    cond = fam.encode_prompts(pipe, ["a red dress", "a blue hat"])
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=fam.default_lora_targets,
                                            init_lora_weights="gaussian"))
    per_image = fam.training_loss(pipe, wide, cond, torch.Generator().manual_seed(0), reduce=False)
    loss = fam.training_loss(pipe, wide, cond, torch.Generator().manual_seed(0))
    assert per_image.shape == (2,) and torch.allclose(per_image.mean(), loss)
    loss.backward()
    grads = [p.grad for p in lora_params(pipe.transformer).values()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    tall = fam.encode_images(pipe, torch.rand(2, 3, 48, 32) * 2 - 1, torch.Generator().manual_seed(0))
    assert torch.isfinite(fam.training_loss(pipe, tall, cond, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="even"):
        fam.training_loss(pipe, torch.zeros(2, 4, 15, 16), cond, torch.Generator().manual_seed(0))


def test_training_lowers_the_loss_on_a_fixed_batch(trained):
    _, (before, after), _ = trained
    assert after < 0.9 * before, (before, after)


def test_the_stock_pipeline_loads_the_whole_adapter_and_reproduces_the_model(trained, tiny_flux, fam):
    from diffusers import FluxPipeline
    from safetensors import safe_open

    pipe, _, lora_dir = trained
    with safe_open(str(lora_dir / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert meta["stunning.family"] == "flux" and "lora_adapter_metadata" in meta

    stock = FluxPipeline.from_pretrained(str(tiny_flux), local_files_only=True)  # no project code
    stock.load_lora_weights(str(lora_dir))
    ours = {n.replace(".default.", "."): p for n, p in lora_params(pipe.transformer).items()}
    theirs = {n.replace(".default_0.", "."): p for n, p in lora_params(stock.transformer).items()}
    assert set(theirs) == set(ours)  # every trained layer, attention included, was loaded
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    # The same prediction as the trained model on the same input.
    cond = fam.encode_prompts(pipe, ["a red dress"])
    x = torch.randn(1, pipe.transformer.config.in_channels // 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = fam.training_loss(pipe, x, cond, torch.Generator().manual_seed(3))
        b = fam.training_loss(stock, x, cond, torch.Generator().manual_seed(3))
    assert float(a) == pytest.approx(float(b), rel=1e-5)
    out = stock("a red dress", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                height=32, width=32, max_sequence_length=16)
    assert out.images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("sampler", ["euler", "euler-ancestral", "dpm++"])
def test_generation_is_seeded(tiny_flux, fam, sampler):
    pipe = load(tiny_flux)
    fam.set_sampler(pipe, sampler)
    a, c = fam.generate(pipe, ["a blue hat", "a blue hat"], [3, 4], steps=3, guidance_scale=3.5)
    b = fam.generate(pipe, ["a blue hat"], [3], steps=3, guidance_scale=3.5)[0]
    assert a.size == (32, 32)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_sampler_errors(tiny_flux, tiny_flux_schnell, fam):
    with pytest.raises(ValueError, match="unknown sampler"):
        fam.set_sampler(load(tiny_flux), "heun-9000")
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = load(tiny_flux_schnell)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # constant shift: no mu for DPM-Solver
    with pytest.raises(ValueError, match="dynamic shifting"):
        fam.set_sampler(pipe, "dpm++")


def test_missing_model_names_the_folder_and_the_fix(tiny_flux, fam, tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist.*base.path"):
        fam.load_pipeline(tmp_path / "nowhere", torch.device("cpu"), torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json is missing"):
        fam.load_pipeline(tmp_path / "empty", torch.device("cpu"), torch.float32)
    no_t5 = shutil.copytree(tiny_flux, tmp_path / "no-t5")
    shutil.rmtree(no_t5 / "text_encoder_2")
    with pytest.raises(ModelNotFoundError, match=r"lacks the component folder\(s\) \['text_encoder_2'\]"):
        fam.load_pipeline(no_t5, torch.device("cpu"), torch.float32)


def test_default_targets_cover_both_streams_and_the_single_blocks(tiny_flux, fam):
    from peft import LoraConfig

    pipe = load(tiny_flux)
    pipe.transformer.add_adapter(LoraConfig(r=2, target_modules=fam.default_lora_targets))
    adapted = {n.split(".lora_A")[0] for n in lora_params(pipe.transformer) if ".lora_A" in n}
    double = {f"transformer_blocks.0.attn.{m}" for m in
              ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
    single = {f"single_transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")}
    assert double | single | {"single_transformer_blocks.0.proj_out"} <= adapted


@pytest.mark.parametrize("block", ["transformer_blocks.0", "single_transformer_blocks.0"])
def test_block_wise_targets_adapt_only_that_block(tiny_flux, fam, block):
    from stunning.training.adapter import lora_config
    from tests.factories import tiny_train_config

    pipe = load(tiny_flux)
    cfg = tiny_train_config(target_modules=fam.default_lora_targets, target_blocks=[block])
    pipe.transformer.add_adapter(lora_config(cfg))
    adapted = {n.split(".lora_A")[0] for n in lora_params(pipe.transformer) if ".lora_A" in n}
    assert adapted and all(a.startswith(block + ".") for a in adapted), adapted
    assert any(a.endswith("attn.to_q") for a in adapted)
    assert fam.block_pattern.format(i=0) in block + "."


def test_the_trainer_trains_flux(tiny_flux, tmp_path):
    """`train_style` (the pipeline's trainer) end to end on the tiny FLUX model."""
    from diffusers import FluxPipeline
    from safetensors import safe_open

    from stunning.training.trainer import train_style
    from tests.factories import make_curated, tiny_train_config

    fam = get_family("flux")
    curated = make_curated(tmp_path / "curated", n_train=4, n_val=2)
    cfg = tiny_train_config(steps=4, batch_size=2, checkpoint_every=2, learning_rate=5e-3,
                      target_modules=fam.default_lora_targets, caption_dropout=0.2)
    summary = train_style(tiny_flux, "flux", curated, "noir", cfg, tmp_path / "out", None, tmp_path / "ckpt",
                          device="cpu", sample_seeds=[0], samples_dir=tmp_path / "samples")
    assert summary["steps"] == 4 and summary["val_loss"] is not None
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["loss_history"])
    with safe_open(summary["adapter"], framework="pt") as f:
        assert f.metadata()["stunning.family"] == "flux"
        n_keys = len(list(f.keys()))
    assert len(list((tmp_path / "samples" / "noir").glob("*.png"))) == 1
    stock = FluxPipeline.from_pretrained(str(tiny_flux), local_files_only=True)
    stock.load_lora_weights(str(Path(summary["adapter"]).parent))
    assert len(lora_params(stock.transformer)) == n_keys


def test_blend_fuse_and_quantize_work_on_flux_adapters(trained, tiny_flux, fam, tmp_path):
    """The stages after training: blending two FLUX adapters, fusing, int8 quantization."""
    from diffusers import FluxPipeline

    from stunning.blend import blend_adapters, fuse
    from stunning.quantize import load_quantized, quantize_denoiser
    from tests.factories import random_lora

    pipe, _, lora_a = trained
    other = load(tiny_flux)
    torch.manual_seed(7)
    random_lora(other, tmp_path / "b", "flux", None, rank=2, alpha=2, targets=["to_q", "to_v", "proj_mlp"], scale=0.05)
    blend = blend_adapters({"a": lora_a, "b": tmp_path / "b"}, {"a": 0.5, "b": 0.5}, tmp_path / "blend")

    stock = FluxPipeline.from_pretrained(str(tiny_flux), local_files_only=True)
    stock.load_lora_weights(str(tmp_path / "blend"))
    assert len(lora_params(stock.transformer)) == 2 * blend.layers

    fused = fuse(tiny_flux, fam, tmp_path / "blend", tmp_path / "fused")
    assert json.loads((fused / "stunning.json").read_text())["resolution"] == 32
    q = quantize_denoiser(fused, fam, tmp_path / "q")
    assert q.component == "transformer" and q.quantized_bytes < q.fp32_bytes
    quantized = load_quantized(fused, tmp_path / "q")  # loaded outside the family: settings from its folder
    assert fam.resolution(quantized) == 32 and fam.t5_tokens(quantized) == 16
    assert fam.generate(quantized, ["a red dress"], [0], steps=2, guidance_scale=3.5)[0].size == (32, 32)
