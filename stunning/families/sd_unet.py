"""Stable Diffusion 1.x/2.x family: UNet2DConditionModel + AutoencoderKL + CLIP text encoder.

Loads a local diffusers folder with the stock `StableDiffusionPipeline`, encodes prompts
with the CLIP text encoder, and trains with the DDPM objective (Ho et al. 2020,
arXiv:2006.11239): noise the latents at a uniformly drawn timestep and regress the noise
(epsilon) or the velocity (v-prediction, Salimans & Ho 2022, arXiv:2202.00512) according to
the scheduler's `prediction_type`. Adapters are saved in the diffusers LoRA layout so that
stock `pipe.load_lora_weights(dir)` loads them without this project.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from stunning.families.base import Family, ModelNotFoundError, negatives_for, sample_posterior  # noqa: F401
from stunning.families.base import check_model_dir as _check

log = logging.getLogger(__name__)

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_model_dir(path: Path) -> None:
    """Raise :class:`ModelNotFoundError` naming what is missing and how to get it."""
    _check(Path(path), REQUIRED_COMPONENTS)


class SDUNetFamily(Family):
    """The `sd-unet` family (Stable Diffusion 1.5/2.x layout)."""

    name = "sd-unet"
    required_components = REQUIRED_COMPONENTS
    lora_component = "unet"
    lora_components = ("unet", "text_encoder")
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    block_pattern = "blocks.{i}."

    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def frozen_modules(self, pipe):
        return [pipe.unet, pipe.vae, pipe.text_encoder]

    def load_pipeline(self, path, device, dtype):
        from diffusers import StableDiffusionPipeline

        check_model_dir(Path(path))
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path), dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def denoiser(self, pipe):
        return pipe.unet

    def resolution(self, pipe) -> int:
        return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts):
        tok = pipe.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0]

    def latents_from_moments(self, pipe, mean, std, generator):
        return sample_posterior(mean, std, generator) * pipe.vae.config.scaling_factor

    def noise_scheduler(self, pipe):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def training_loss(self, pipe, latents, cond, generator, scheduler=None):
        """DDPM loss: MSE between the UNet output and the epsilon or v target."""
        scheduler = scheduler or self.noise_scheduler(pipe)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
        )
        noisy = scheduler.add_noise(latents, noise, t)
        if scheduler.config.prediction_type == "epsilon":
            target = noise
        elif scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, t)
        else:
            raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
        pred = pipe.unet(noisy, t, encoder_hidden_states=cond).sample
        return F.mse_loss(pred.float(), target.float())

    @torch.no_grad()
    def generate(self, pipe, prompts, seeds, steps, guidance_scale, *, negative_prompts=None, on_step=None):
        """One image per (prompt, seed), seeded per image so results are reproducible."""
        device = pipe.unet.device
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        res = self.resolution(pipe)
        out = pipe(
            list(prompts),
            generator=gens,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=res,
            width=res,
            output_type="pil",
            negative_prompt=negatives_for(negative_prompts, prompts),
            **self.step_kwargs(pipe, on_step, steps),
        )
        log.debug("generated %d images on %s", len(out.images), device)
        return list(out.images)


FAMILY = SDUNetFamily()
