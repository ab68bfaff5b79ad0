"""Stable Diffusion XL family: UNet2DConditionModel (text_time) + AutoencoderKL + two CLIP encoders.

Loads a local diffusers folder with the stock `StableDiffusionXLPipeline` and trains with the
DDPM objective of SD 1.x (epsilon or v-prediction by the scheduler's `prediction_type`).
What SDXL adds (Podell et al. 2023, arXiv:2307.01952):

- two text encoders (CLIP ViT-L and OpenCLIP bigG): their penultimate hidden states are
  concatenated per token, and the second one's pooled, projected output conditions the
  UNet's additional embedding;
- size and crop conditioning, six "time ids" (original height and width, crop top and left,
  target height and width) added to that embedding.

Conditioning is one tensor per image in this project's trainer, so
:meth:`SDXLFamily.encode_prompts` *packs* the pooled vector as one extra, zero-padded token
at the end of the sequence and :func:`unpack` splits it again (as the sd3 module does). The
time ids are not cached: they are computed from the latent's own spatial size in
:meth:`SDXLFamily.training_loss` (original = target = the image size, no crop), so every
aspect-ratio bucket gets the conditioning the stock pipeline gives that size at sampling.

Adapters are saved in the diffusers SDXL LoRA layout, which stock
`StableDiffusionXLPipeline.load_lora_weights(dir)` loads.

Precision: SDXL's VAE overflows in float16 (its config sets ``force_upcast``), so
:meth:`SDXLFamily.load_pipeline` keeps it in float32 under float16, and
:meth:`SDXLFamily.generate` denoises with the stock pipeline but decodes the latents itself in
the VAE's dtype (the stock pipeline, given a float32 VAE and float16 latents, fails on CUDA
and casts the VAE down to float16 on MPS).

Samplers (:data:`SAMPLERS`, ``validate.sampler``): ``euler`` (the model's own Euler),
``euler-ancestral`` and ``dpm++`` (DPM-Solver++ 2M), each built from the model's scheduler
config so its betas and ``prediction_type`` carry over.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from stunning.families.base import (
    Family,
    ModelNotFoundError,
    check_model_dir,
    negatives_for,
    sample_posterior,
)

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
SAMPLERS = ("euler", "euler-ancestral", "dpm++")


def unpack(pipe, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split packed conditioning into (per-token embeddings, pooled text embeddings)."""
    pooled_dim = pipe.text_encoder_2.config.projection_dim
    return cond[:, :-1], cond[:, -1, :pooled_dim]


def time_ids(latents: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """SDXL's six size/crop ids per image for latents of this spatial size: (N, 6).

    Original and target size are the image size the latent decodes to, the crop is (0, 0):
    what `StableDiffusionXLPipeline` passes by default when sampling at that size.
    """
    h, w = latents.shape[-2] * vae_scale_factor, latents.shape[-1] * vae_scale_factor
    ids = torch.tensor([h, w, 0, 0, h, w], device=latents.device, dtype=latents.dtype)
    return ids.expand(latents.shape[0], 6)


def _latent_stats(vae, like: torch.Tensor):
    """(mean, std) per latent channel where the VAE config gives them (else None): the stock
    pipeline denormalises with them before decoding, so encoding normalises with them too."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    return (torch.tensor(mean).view(1, -1, 1, 1).to(like), torch.tensor(std).view(1, -1, 1, 1).to(like))


def decode(pipe, latents: torch.Tensor) -> list:
    """Scaled latents → PIL images, decoded in the VAE's own dtype (float32 where it must be)."""
    vae = pipe.vae
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    stats = _latent_stats(vae, latents)
    if stats is None:
        latents = latents / vae.config.scaling_factor
    else:
        latents = latents * stats[1] / vae.config.scaling_factor + stats[0]
    images = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type="pil")


class SDXLFamily(Family):
    """The `sdxl` family (Stable Diffusion XL layout, base model; no refiner)."""

    name = "sdxl"
    required_components = REQUIRED_COMPONENTS
    lora_component = "unet"
    lora_components = ("unet", "text_encoder", "text_encoder_2")
    # The attention projections of every transformer block (self- and cross-attention).
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    # Block-wise selection (train.target_blocks): e.g. "down_blocks.2", "mid_block", "up_blocks.0".
    block_pattern = "down_blocks.{i}."
    samplers = SAMPLERS

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def load_pipeline(self, path, device, dtype):
        from diffusers import StableDiffusionXLPipeline

        from stunning.device import vae_needs_fp32

        check_model_dir(Path(path), self.required_components)
        # No invisible watermark: it needs the optional `invisible-watermark` package and
        # alters the pixels the validation phase measures.
        pipe = StableDiffusionXLPipeline.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, add_watermarker=False
        )
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device)
        if vae_needs_fp32(pipe.vae, dtype):
            pipe.vae.to(torch.float32)  # SDXL's VAE overflows in float16 (its config says force_upcast)
        return pipe

    def denoiser(self, pipe):
        return pipe.unet

    def frozen_modules(self, pipe):
        return [pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]

    def resolution(self, pipe) -> int:
        return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts):
        """Packed conditioning: both encoders' per-token states, then the pooled vector as a token."""
        embeds, _, pooled, _ = pipe.encode_prompt(
            list(prompts), list(prompts), device=pipe.text_encoder.device, do_classifier_free_guidance=False
        )
        pad = embeds.shape[-1] - pooled.shape[-1]
        if pad < 0:
            raise ValueError("pooled text embedding wider than the token embeddings; not an SDXL layout")
        return torch.cat([embeds, F.pad(pooled, (0, pad))[:, None, :]], dim=1)

    def latents_from_moments(self, pipe, mean, std, generator):
        z = sample_posterior(mean, std, generator)
        stats = _latent_stats(pipe.vae, z)
        if stats is not None:  # the inverse of what `decode` (and the stock pipeline) does
            z = (z - stats[0]) / stats[1]
        return z * pipe.vae.config.scaling_factor

    def noise_scheduler(self, pipe):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def training_loss(self, pipe, latents, cond, generator, scheduler=None):
        """DDPM loss with SDXL's pooled-text and size conditioning (see the module docstring)."""
        scheduler = scheduler or self.noise_scheduler(pipe)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
        )
        noisy = scheduler.add_noise(latents, noise, t)
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, t)
        else:
            raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
        embeds, pooled = unpack(pipe, cond)
        added = {"text_embeds": pooled, "time_ids": time_ids(latents, pipe.vae_scale_factor)}
        pred = pipe.unet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
        return F.mse_loss(pred.float(), target.float())

    def set_sampler(self, pipe, sampler: str) -> None:
        """Swap the pipeline's scheduler for one of :data:`SAMPLERS` (same betas and prediction type)."""
        from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

        config = pipe.scheduler.config
        if sampler == "euler":
            pipe.scheduler = EulerDiscreteScheduler.from_config(config)
        elif sampler == "euler-ancestral":
            pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(config)
        elif sampler == "dpm++":
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(
                config, algorithm_type="dpmsolver++", solver_order=2
            )
        else:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")

    @torch.no_grad()
    def generate(self, pipe, prompts, seeds, steps, guidance_scale, *, negative_prompts=None, on_step=None):
        """One image per (prompt, seed), seeded per image so results are reproducible.

        The stock pipeline denoises; :func:`decode` turns its latents into images (see the
        module docstring on precision).
        """
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        res = self.resolution(pipe)
        latents = pipe(
            list(prompts), generator=gens, num_inference_steps=steps, guidance_scale=guidance_scale,
            height=res, width=res, output_type="latent",
            negative_prompt=negatives_for(negative_prompts, prompts), **self.step_kwargs(pipe, on_step, steps),
        ).images
        return decode(pipe, latents)


FAMILY = SDXLFamily()
__all__ = ["FAMILY", "SDXLFamily", "ModelNotFoundError", "SAMPLERS", "decode", "unpack", "time_ids"]
