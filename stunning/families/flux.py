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
Adapters are saved in the diffusers FLUX LoRA layout (PEFT's ``transformer.<module>.lora_A/B``
keys, as diffusers' FLUX LoRA scripts write them), which stock `FluxPipeline.load_lora_weights(dir)`
loads completely (`Family.lora_layers` in `stunning.families.base` says why UNet names are not used).

Samplers (:data:`SAMPLERS`): ``euler`` (flow-matching Euler, the model's own scheduler),
``euler-ancestral`` (the same with stochastic re-noising) and ``dpm++`` (DPM-Solver++ 2M on
flow sigmas, for models with dynamic shifting).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from stunning.families.base import (
    Family,
    ModelNotFoundError,
    check_model_dir,
    model_settings,
    negatives_for,
    sample_posterior,
)

REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
DEFAULT_T5_TOKENS = 512  # FluxPipeline's max_sequence_length
SAMPLERS = ("euler", "euler-ancestral", "dpm++")


def unpack(pipe, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split packed conditioning into (T5 per-token embeddings, CLIP pooled vector)."""
    pooled_dim = pipe.transformer.config.pooled_projection_dim
    return cond[:, :-1], cond[:, -1, :pooled_dim]


def shift_sigmas(sigmas: torch.Tensor, scheduler_config, image_seq_len: int) -> torch.Tensor:
    """Shift sigmas in (0, 1) as the FLUX sampler does for an image of `image_seq_len` patches.

    Dynamic shifting: ``mu`` grows linearly with the sequence length between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), exactly as
    `FluxPipeline` computes it before sampling, and sigmas map through the scheduler's time
    shift, ``e^mu / (e^mu + 1/σ − 1)`` (``time_shift_type`` "exponential", FLUX's) or
    ``mu / (mu + 1/σ − 1)`` ("linear"). Without dynamic shifting, the constant ``shift``.
    """
    cfg = dict(scheduler_config)
    if cfg.get("use_dynamic_shifting"):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(
            image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15),
        )
        kind = cfg.get("time_shift_type", "exponential")
        if kind == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        if kind == "linear":
            return mu / (mu + (1 / sigmas - 1))
        raise ValueError(f"scheduler config time_shift_type={kind!r}: expected 'exponential' or 'linear'")
    shift = float(cfg.get("shift", 1.0))
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def pack_latents(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) latents → (the (N, H/2·W/2, 4C) 2x2-patch sequence, its (H/2·W/2, 3) position ids).

    The layout and ids `FluxPipeline.prepare_latents` makes for sampling at that size, so
    training sees what sampling sees, for any even H and W (aspect buckets included).
    """
    from diffusers import FluxPipeline

    n, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: latent size {h}x{w} must be even on both sides")
    packed = FluxPipeline._pack_latents(latents, n, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, latents.device, latents.dtype)
    return packed, ids


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for an (h, w) latent."""
    n, seq, c4 = packed.shape
    if seq != (h // 2) * (w // 2):
        raise ValueError(f"{seq} patches do not make a {h}x{w} latent")
    x = packed.view(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c4 // 4, h, w)


class FluxFamily(Family):
    """The `flux` family (FLUX.1 dev/schnell layout, flow matching)."""

    name = "flux"
    required_components = REQUIRED_COMPONENTS
    lora_component = "transformer"
    lora_components = ("transformer", "text_encoder")
    # Every linear layer of the blocks, as FLUX LoRA trainers do by default (the diffusers FLUX
    # script adds the MLPs to attention too). Attention alone learns far more slowly: on the tiny
    # model, a fixed batch, rank 4, 15 AdamW steps at 1e-2, 6 % vs 16 % lower loss (measured):
    # both streams' attention (to_*, add_*_proj, to_add_out) and MLPs (ff, ff_context) of the
    # double blocks; the single blocks' shared attention, MLP input (proj_mlp) and output
    # (proj_out, which also names the model's final projection).
    default_lora_targets = [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
    ]
    # Block-wise selection (train.target_blocks): "transformer_blocks.N" (double stream) or
    # "single_transformer_blocks.N" (single stream). `target_modules()` in training/adapter.py anchors
    # a block name at a "." boundary, so "transformer_blocks.0" never selects the single block 0.
    block_pattern = "transformer_blocks.{i}."
    samplers = SAMPLERS
    # The guidance value fed to a guidance-distilled transformer (`guidance_embeds`, FLUX.1-dev)
    # while training. 1.0, as the diffusers FLUX LoRA scripts default to: the adapter learns the
    # style, not a guidance strength, and sampling still takes any `guidance_scale`. Ignored by
    # models without a guidance embedding (FLUX.1-schnell).
    train_guidance: float = 1.0

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
        self._apply_resolution(pipe, settings)
        return pipe.to(device)

    @staticmethod
    def _settings_of(pipe) -> dict:
        source = getattr(pipe, "name_or_path", None)
        return model_settings(Path(source)) if source else {}

    def _apply_resolution(self, pipe, settings: dict) -> None:
        # The stock default is 1024 px; a small model names its own in stunning.json.
        if "resolution" in settings:
            pipe.default_sample_size = int(settings["resolution"]) // pipe.vae_scale_factor
        pipe._stunning_resolution_set = True

    def t5_tokens(self, pipe) -> int:
        """T5 tokens per prompt: set at load, else from the folder the pipeline came from."""
        n = getattr(pipe, "_stunning_t5_tokens", None)
        if n is None:
            n = self._settings_of(pipe).get("t5_tokens", DEFAULT_T5_TOKENS)
            pipe._stunning_t5_tokens = int(n)
        return int(n)

    def denoiser(self, pipe):
        return pipe.transformer

    def frozen_modules(self, pipe):
        return [pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]

    def resolution(self, pipe) -> int:
        """Square sampling size in pixels; also right for a pipeline loaded outside
        :meth:`load_pipeline` (e.g. `stunning.quantize.load_quantized`), from its folder."""
        if not getattr(pipe, "_stunning_resolution_set", False):
            self._apply_resolution(pipe, self._settings_of(pipe))
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

    def latents_from_moments(self, pipe, mean, std, generator):
        shift = pipe.vae.config.shift_factor or 0.0
        return (sample_posterior(mean, std, generator) - shift) * pipe.vae.config.scaling_factor

    def noise_scheduler(self, pipe):
        return pipe.scheduler

    def training_loss(self, pipe, latents, cond, generator, scheduler=None, reduce=True):
        """Flow-matching loss on packed latents (see the module docstring).

        `latents` are (N, C, H, W) with even H and W; `cond` is :meth:`encode_prompts`' packing.
        With ``reduce=False``, one loss per image.
        """
        n, _, h, w = latents.shape
        packed, img_ids = pack_latents(latents)  # also refuses odd sizes before any RNG draw
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        # Logit-normal density (Esser et al. 2024, sec. 3.1), shifted for this image size.
        u = torch.randn(n, generator=generator, device=latents.device)
        sigma = shift_sigmas(torch.sigmoid(u), (scheduler or pipe.scheduler).config, packed.shape[1])
        sigma = sigma.to(latents.dtype)
        s = sigma.view(-1, 1, 1, 1)
        noisy, _ = pack_latents((1 - s) * latents + s * noise)
        embeds, pooled = unpack(pipe, cond)
        transformer = pipe.transformer
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((n,), float(self.train_guidance), device=latents.device, dtype=latents.dtype)
        pred = transformer(
            hidden_states=noisy,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=sigma,  # FLUX's transformer scales (0, 1] timesteps by 1000 itself
            img_ids=img_ids,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=latents.dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        err = (unpack_latents(pred, h, w).float() - (noise - latents).float()) ** 2
        return err.mean() if reduce else err.mean(dim=(1, 2, 3))

    def set_sampler(self, pipe, sampler: str) -> None:
        """Swap the pipeline's scheduler for one of :data:`SAMPLERS` (same sigma shifting)."""
        from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

        config = dict(pipe.scheduler.config)
        dynamic = bool(config.get("use_dynamic_shifting"))
        if sampler in ("euler", "euler-ancestral"):
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                config, stochastic_sampling=sampler == "euler-ancestral"
            )
        elif sampler == "dpm++":
            # FluxPipeline hands DPM-Solver only `mu` (e^mu becomes its flow shift, the same
            # sigmas as FLUX's exponential time shift); a constant-shift model has no mu to match.
            if not dynamic or config.get("time_shift_type", "exponential") != "exponential":
                raise ValueError("sampler 'dpm++' needs a scheduler with exponential dynamic shifting "
                                 "(FLUX.1-dev/schnell have it); use euler or euler-ancestral")
            dpm = DPMSolverMultistepScheduler(
                num_train_timesteps=int(config.get("num_train_timesteps", 1000)), use_flow_sigmas=True,
                prediction_type="flow_prediction", use_dynamic_shifting=True, algorithm_type="dpmsolver++",
                solver_order=2,
            )
            # The pipeline reads mu's line from the scheduler config: keep the model's, not defaults.
            keys = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
            dpm.register_to_config(**{k: config[k] for k in keys if k in config})
            pipe.scheduler = dpm
        else:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")

    @torch.no_grad()
    def preview_latents(self, pipe, latents):
        """The pipeline's packed 2x2-patch latents unpacked to `(b, c, h, w)` at the model's size."""
        side = self.resolution(pipe) // pipe.vae_scale_factor
        return unpack_latents(latents, side, side)

    def generate(self, pipe, prompts, seeds, steps, guidance_scale, *, negative_prompts=None, on_step=None):
        """One image per (prompt, seed), seeded per image so results are reproducible.

        `guidance_scale` feeds the guidance embedding of guidance-distilled models (FLUX.1-dev);
        models without one ignore it, as the stock pipeline does. A non-empty negative prompt
        turns on the stock pipeline's true classifier-free guidance at `guidance_scale` (two
        transformer passes per step). A stochastic sampler
        (euler-ancestral) draws its step noise from the global RNG, which `FluxPipeline` gives no
        generator for: each image is then sampled alone with that RNG forked and seeded.
        """
        res = self.resolution(pipe)
        kwargs = dict(num_inference_steps=steps, guidance_scale=guidance_scale, height=res, width=res,
                      output_type="pil", max_sequence_length=self.t5_tokens(pipe),
                      **self.step_kwargs(pipe, on_step, steps))
        negatives = negatives_for(negative_prompts, prompts)
        if negatives is not None and any(negatives):
            kwargs["true_cfg_scale"] = max(float(guidance_scale), 1.0)
        if not pipe.scheduler.config.get("stochastic_sampling", False):
            gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
            if negatives is not None and any(negatives):
                kwargs["negative_prompt"] = negatives
            return list(pipe(list(prompts), generator=gens, **kwargs).images)
        dev = pipe.transformer.device
        fork = {"devices": [dev], "device_type": dev.type} if dev.type in ("cuda", "mps") else {"devices": []}
        images = []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
            if negatives is not None and any(negatives):
                kwargs["negative_prompt"] = [negatives[i]]
            with torch.random.fork_rng(**fork):
                torch.manual_seed(int(seed))
                gen = torch.Generator(device="cpu").manual_seed(int(seed))
                images += pipe([prompt], generator=[gen], **kwargs).images
        return images


FAMILY = FluxFamily()
__all__ = [
    "FAMILY", "SAMPLERS", "FluxFamily", "ModelNotFoundError", "pack_latents", "shift_sigmas", "unpack",
    "unpack_latents",
]
