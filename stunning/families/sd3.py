"""Stable Diffusion 3/3.5 family: SD3Transformer2DModel (MMDiT) + AutoencoderKL + CLIP (+ T5).

Loads a local diffusers folder with the stock `StableDiffusion3Pipeline` and trains with
rectified flow matching (Esser et al. 2024, arXiv:2403.03206): a clean latent ``x0`` and
noise ``ε`` are mixed as ``x_t = (1 − σ) x0 + σ ε`` at a sigma drawn from a logit-normal
distribution (the paper's best sampler, shifted like the scheduler's ``shift``), and the
transformer regresses the velocity ``ε − x0`` at timestep ``1000 σ``.

Prompt conditioning is two tensors in SD3 (per-token embeddings and a pooled vector). The
trainer caches and batches one tensor per image, so :meth:`SD3Family.encode_prompts`
*packs* the pooled vector as one extra, zero-padded token at the end of the sequence and
:func:`unpack` splits it again; nothing outside this module sees the packing.

The third text encoder (T5) is optional in SD3; without it the stock pipeline feeds
``max_sequence_length`` zero tokens. A model trained without T5 (the project's micro model)
records the count it was trained with as ``t5_tokens`` in the folder's ``stunning.json``
and every call here passes it, so training and sampling see the same context.

Samplers (:data:`SAMPLERS`): ``euler`` (flow-matching Euler, the model's own scheduler),
``euler-ancestral`` (the same with stochastic re-noising each step) and ``dpm++``
(DPM-Solver++ 2M on flow sigmas).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from stunning.families.base import (
    Family,
    ModelNotFoundError,
    absent_components,
    check_model_dir,
    model_settings,
    negatives_for,
    sample_posterior,
)

log = logging.getLogger(__name__)

REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
DEFAULT_T5_TOKENS = 256  # the stock pipeline's max_sequence_length
SAMPLERS = ("euler", "euler-ancestral", "dpm++")


def unpack(pipe, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split packed conditioning into (per-token embeddings, pooled projections)."""
    pooled_dim = pipe.transformer.config.pooled_projection_dim
    return cond[:, :-1], cond[:, -1, :pooled_dim]


def logit_normal_sigmas(n: int, generator: torch.Generator, device, shift: float = 1.0,
                        mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Sigmas in (0, 1) from SD3's logit-normal density, shifted like FlowMatchEuler's ``shift``."""
    u = torch.randn(n, generator=generator, device=device) * std + mean
    s = torch.sigmoid(u)
    return shift * s / (1 + (shift - 1) * s)


class SD3Family(Family):
    """The `sd3` family (Stable Diffusion 3 / 3.5 layout, flow matching)."""

    name = "sd3"
    required_components = REQUIRED_COMPONENTS
    lora_component = "transformer"
    lora_components = ("transformer", "text_encoder", "text_encoder_2")
    # Attention of both streams (image: to_*, text: add_*_proj/to_add_out) and the image MLP.
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    block_pattern = "transformer_blocks.{i}."
    samplers = SAMPLERS

    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def load_pipeline(self, path, device, dtype):
        from diffusers import StableDiffusion3Pipeline

        check_model_dir(Path(path), self.required_components)
        pipe = StableDiffusion3Pipeline.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, **absent_components(Path(path))
        )
        pipe.set_progress_bar_config(disable=True)
        settings = model_settings(Path(path))
        # Where the pipeline came from decides its T5 token count; kept on the object.
        pipe._stunning_t5_tokens = int(settings.get("t5_tokens", DEFAULT_T5_TOKENS))
        return pipe.to(device)

    def denoiser(self, pipe):
        return pipe.transformer

    def frozen_modules(self, pipe):
        return [m for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
                if m is not None]

    def resolution(self, pipe) -> int:
        return int(pipe.transformer.config.sample_size * pipe.vae_scale_factor)

    def t5_tokens(self, pipe) -> int:
        """Zero T5 tokens the model expects: set at load, else from the folder it came from."""
        n = getattr(pipe, "_stunning_t5_tokens", None)
        if n is None:
            source = getattr(pipe, "name_or_path", None)
            n = model_settings(Path(source)).get("t5_tokens", DEFAULT_T5_TOKENS) if source else DEFAULT_T5_TOKENS
            pipe._stunning_t5_tokens = int(n)
        return int(n)

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts):
        return self.encode_prompts_with_grad(pipe, prompts)

    def encode_prompts_with_grad(self, pipe, prompts):
        """Packed conditioning (see module docstring); differentiable for joint pretraining."""
        embeds, _, pooled, _ = pipe.encode_prompt(
            list(prompts), list(prompts), list(prompts), do_classifier_free_guidance=False,
            max_sequence_length=self.t5_tokens(pipe), device=pipe.text_encoder.device,
        )
        pad = embeds.shape[-1] - pooled.shape[-1]
        if pad < 0:
            raise ValueError("pooled projection wider than the joint attention width; not an SD3 layout")
        return torch.cat([embeds, F.pad(pooled, (0, pad))[:, None, :]], dim=1)

    def latents_from_moments(self, pipe, mean, std, generator):
        shift = pipe.vae.config.shift_factor or 0.0
        return (sample_posterior(mean, std, generator) - shift) * pipe.vae.config.scaling_factor

    def noise_scheduler(self, pipe):
        return pipe.scheduler

    def training_loss(self, pipe, latents, cond, generator, scheduler=None, reduce=True):
        """Flow-matching loss: MSE between the predicted and the true velocity ``ε − x0``."""
        shift = float(getattr((scheduler or pipe.scheduler).config, "shift", 1.0))
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        sigma = logit_normal_sigmas(latents.shape[0], generator, latents.device, shift).to(latents.dtype)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        embeds, pooled = unpack(pipe, cond)
        pred = pipe.transformer(
            hidden_states=noisy, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=sigma * 1000
        ).sample
        err = (pred.float() - (noise - latents).float()) ** 2
        return err.mean() if reduce else err.mean(dim=(1, 2, 3))

    def set_sampler(self, pipe, sampler: str) -> None:
        """Swap the pipeline's scheduler for one of :data:`SAMPLERS` (same sigma shift)."""
        from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

        shift = float(pipe.scheduler.config.get("shift", 1.0))
        if sampler == "euler":
            pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        elif sampler == "euler-ancestral":
            pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=True)
        elif sampler == "dpm++":
            pipe.scheduler = DPMSolverMultistepScheduler(
                use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift,
                algorithm_type="dpmsolver++", solver_order=2,
            )
        else:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")

    @torch.no_grad()
    def generate(self, pipe, prompts, seeds, steps, guidance_scale, tiled_vae: bool = False, *,
                 negative_prompts=None, on_step=None):
        """One image per (prompt, seed), seeded per image so results are reproducible."""
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        res = self.resolution(pipe)
        if tiled_vae:
            pipe.vae.enable_tiling()
        try:
            out = pipe(
                list(prompts), generator=gens, num_inference_steps=steps, guidance_scale=guidance_scale,
                height=res, width=res, output_type="pil", max_sequence_length=self.t5_tokens(pipe),
                negative_prompt=negatives_for(negative_prompts, prompts),
                **self.step_kwargs(pipe, on_step, steps),
            )
        finally:
            if tiled_vae:
                pipe.vae.disable_tiling()
        return list(out.images)


FAMILY = SD3Family()
__all__ = ["FAMILY", "SD3Family", "ModelNotFoundError", "unpack", "logit_normal_sigmas", "SAMPLERS"]
