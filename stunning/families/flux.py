"""FLUX.1 family: FluxTransformer2DModel (double- and single-stream MMDiT) + AutoencoderKL + CLIP + T5.

Loads a local diffusers folder with the stock `FluxPipeline` and trains with rectified flow
matching, as FLUX was trained (Black Forest Labs 2024; Esser et al. 2024, arXiv:2403.03206):
``x_t = (1 − σ) x0 + σ ε``, the transformer regresses the velocity ``ε − x0``. Sigmas come
from a logit-normal density; when the scheduler uses dynamic shifting (FLUX.1-dev and
-schnell configs do) they are shifted by the resolution-dependent ``mu`` the sampler uses for
the same image size (:func:`shift_sigmas`), so training and sampling see the same noise levels.

What FLUX needs that the other families do not:

- latents are a sequence of 2x2 patches. The trainer keeps latents 4-D (N, C, H, W) like every
  family; packing, the positional ids of the patches and unpacking the prediction happen in
  :meth:`FluxFamily.training_loss`, computed from the latent's shape (so aspect buckets work);
- the text conditioning is T5's per-token states plus CLIP's pooled vector. Conditioning is one
  tensor per image in this project's trainer, so :meth:`FluxFamily.encode_prompts` packs the
  pooled vector as one extra, zero-padded token at the end and :func:`unpack` splits it again;
- FLUX.1-dev is guidance-distilled: the transformer takes the guidance scale as an input
  (``guidance_embeds``). Training feeds the constant :attr:`FluxFamily.train_guidance` (1.0,
  what LoRA trainers for dev use, so the adapter does not learn a guidance strength); sampling
  feeds the requested guidance scale, as the stock pipeline does.

The T5 sequence length is the stock pipeline's ``max_sequence_length`` (512) unless the
folder's ``stunning.json`` names another ``t5_tokens`` (the project's tiny model does).
Adapters are saved in the diffusers FLUX LoRA layout, which stock
`FluxPipeline.load_lora_weights(dir)` loads.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from stunning.families import (
    LoraSavingMixin,
    ModelNotFoundError,
    check_model_dir,
    image_moments,
    model_settings,
    register,
    sample_posterior,
)

REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
DEFAULT_T5_TOKENS = 512  # FluxPipeline's max_sequence_length


def unpack(pipe, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split packed conditioning into (T5 per-token embeddings, CLIP pooled vector)."""
    pooled_dim = pipe.transformer.config.pooled_projection_dim
    return cond[:, :-1], cond[:, -1, :pooled_dim]


def shift_sigmas(sigmas: torch.Tensor, scheduler_config, image_seq_len: int) -> torch.Tensor:
    """Shift sigmas in (0, 1) as the FLUX sampler does for an image of `image_seq_len` patches.

    Dynamic shifting: ``mu`` grows linearly with the sequence length between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), and sigmas map through
    ``e^mu / (e^mu + 1/σ − 1)``. Without dynamic shifting, the scheduler's constant ``shift``.
    """
    cfg = dict(scheduler_config)
    if cfg.get("use_dynamic_shifting"):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(
            image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15),
        )
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    shift = float(cfg.get("shift", 1.0))
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FluxFamily(LoraSavingMixin):
    """The `flux` family (FLUX.1 dev/schnell layout, flow matching)."""

    name = "flux"
    required_components = REQUIRED_COMPONENTS
    lora_component = "transformer"
    lora_components = ("transformer", "text_encoder")
    # Every linear layer of the blocks, as FLUX LoRA trainers do by default (attention alone
    # learns a style far more slowly here: measured 1.3 % vs 18 % lower loss after 15 steps):
    # both streams' attention (to_*, add_*_proj, to_add_out) and MLPs (ff, ff_context) of the
    # double blocks; the single blocks' shared attention, MLP input (proj_mlp) and output
    # (proj_out, which also names the model's final projection).
    default_lora_targets = [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
    ]
    # Block-wise selection (train.target_blocks): "transformer_blocks.N" (double stream) or
    # "single_transformer_blocks.N".
    block_pattern = "transformer_blocks.{i}."
    train_guidance = 1.0

    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    def load_pipeline(self, path, device, dtype):
        from diffusers import FluxPipeline

        check_model_dir(Path(path), self.required_components)
        pipe = FluxPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        settings = model_settings(Path(path))
        pipe._stunning_t5_tokens = int(settings.get("t5_tokens", DEFAULT_T5_TOKENS))
        if "resolution" in settings:  # the stock default is 1024 px; a small model names its own
            pipe.default_sample_size = int(settings["resolution"]) // pipe.vae_scale_factor
        return pipe.to(device)

    def t5_tokens(self, pipe) -> int:
        n = getattr(pipe, "_stunning_t5_tokens", None)
        if n is None:
            source = getattr(pipe, "name_or_path", None)
            n = model_settings(Path(source)).get("t5_tokens", DEFAULT_T5_TOKENS) if source else DEFAULT_T5_TOKENS
            pipe._stunning_t5_tokens = int(n)
        return int(n)

    def denoiser(self, pipe):
        return pipe.transformer

    def frozen_modules(self, pipe):
        return [pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]

    def resolution(self, pipe) -> int:
        return int(pipe.default_sample_size * pipe.vae_scale_factor)

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts):
        """Packed conditioning: T5 per-token states, then CLIP's pooled vector as a token."""
        embeds, pooled, _ = pipe.encode_prompt(
            list(prompts), list(prompts), device=pipe.text_encoder.device, max_sequence_length=self.t5_tokens(pipe)
        )
        pad = embeds.shape[-1] - pooled.shape[-1]
        if pad < 0:
            raise ValueError("pooled CLIP vector wider than the T5 embeddings; not a FLUX layout")
        return torch.cat([embeds, F.pad(pooled, (0, pad))[:, None, :]], dim=1)

    @torch.no_grad()
    def encode_images(self, pipe, pixels, generator):
        """Pixels in [-1, 1], NCHW → latents normalised as FLUX does ((z − shift) · scale)."""
        return self.latents_from_moments(pipe, *image_moments(pipe, pixels), generator)

    def latents_from_moments(self, pipe, mean, std, generator):
        shift = pipe.vae.config.shift_factor or 0.0
        return (sample_posterior(mean, std, generator) - shift) * pipe.vae.config.scaling_factor

    def noise_scheduler(self, pipe):
        return pipe.scheduler

    def training_loss(self, pipe, latents, cond, generator, scheduler=None):
        """Flow-matching loss on packed latents (see the module docstring)."""
        from diffusers import FluxPipeline

        n, c, h, w = latents.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX packs 2x2 latent patches: latent size {h}x{w} must be even on both sides")
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        u = torch.randn(n, generator=generator, device=latents.device)
        seq_len = (h // 2) * (w // 2)
        sigma = shift_sigmas(torch.sigmoid(u), (scheduler or pipe.scheduler).config, seq_len).to(latents.dtype)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        embeds, pooled = unpack(pipe, cond)
        transformer = pipe.transformer
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((n,), self.train_guidance, device=latents.device, dtype=latents.dtype)
        pred = transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, n, c, h, w),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=sigma,  # FLUX's transformer scales (0, 1] timesteps by 1000 itself
            img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, latents.device, latents.dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=latents.dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        pred = FluxPipeline._unpack_latents(pred, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                            pipe.vae_scale_factor)
        return F.mse_loss(pred.float(), (noise - latents).float())

    @torch.no_grad()
    def generate(self, pipe, prompts, seeds, steps, guidance_scale):
        """One image per (prompt, seed), seeded per image; `guidance_scale` feeds the guidance
        embedding of guidance-distilled models (FLUX.1-dev) and is ignored by the others."""
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        res = self.resolution(pipe)
        out = pipe(
            list(prompts), generator=gens, num_inference_steps=steps, guidance_scale=guidance_scale,
            height=res, width=res, output_type="pil", max_sequence_length=self.t5_tokens(pipe),
        )
        return list(out.images)


# --------------------------------------------------------------------------- tiny model

TINY_T5_TOKENS = 16
TINY_SETTINGS = {"t5_tokens": TINY_T5_TOKENS, "resolution": 32, "trained": False}


def tiny_t5_tokenizer():
    """A T5 (Unigram, SentencePiece-style) tokenizer over the embedded vocabulary; no download.

    T5's layout: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then whole words of
    :data:`stunning.embedded.VOCABULARY` (scored above single characters, so known words stay
    one token) and every printable ASCII character, so any caption still tokenizes.
    Deterministic: the same ids on every build.
    """
    import string

    from transformers import T5TokenizerFast

    from stunning.embedded import VOCABULARY

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    words = sorted(set(VOCABULARY.split()))
    pieces += [("\u2581" + w, -1.0) for w in words]
    pieces += [(ch, -5.0) for ch in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=TINY_T5_TOKENS)


def tiny_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A randomly initialised tiny `FluxPipeline` (32 px; what `build_tiny(..., "flux")` saves)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from stunning.embedded import RESOLUTION, _clip, load_tokenizer, micro_configs

    clip_tok, t5_tok = load_tokenizer(), tiny_t5_tokenizer()
    clip = _clip(len(clip_tok), hidden=32, layers=2, heads=4)
    vae = {**micro_configs(len(clip_tok))["vae"], "shift_factor": 0.0, "scaling_factor": 1.0}
    t5 = T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
                  decoder_start_token_id=t5_tok.pad_token_id)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * vae["latent_channels"], num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=t5.d_model,
        pooled_projection_dim=clip["hidden_size"], guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=64, max_image_seq_len=1024,
        ),
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip)),
        tokenizer=clip_tok,
        text_encoder_2=T5EncoderModel(t5),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.default_sample_size = RESOLUTION // pipe.vae_scale_factor  # 32 px, not FLUX's 1024
    return pipe


FAMILY = register(FluxFamily())
__all__ = ["FAMILY", "FluxFamily", "ModelNotFoundError", "unpack", "shift_sigmas", "tiny_pipeline"]
