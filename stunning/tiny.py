"""Randomly initialised tiny models of every family: fast stand-ins for tests and benchmarks.

Each is made of the family's real diffusers classes (so loading, LoRA training, saving,
export and sampling run exactly as on a full-size model), scaled down to 32 px and a few
thousand parameters per block, over the embedded model's CLIP tokenizer
(:func:`stunning.embedded.load_tokenizer`). Same seed, same weights: every build is
bit-identical.

- ``sd3``: the micro model's architecture (:func:`stunning.embedded.build_micro`), untrained;
- ``sd-unet``: an SD-1.5-layout UNet of about the micro model's size (:func:`sd_unet_pipeline`);
- ``sdxl``: the SDXL layout, two text encoders and size conditioning (:func:`sdxl_pipeline`);
- ``flux``: the FLUX.1 layout with CLIP + a tiny T5 (:func:`flux_pipeline`).

:func:`build_tiny` saves one as a diffusers folder (plus the ``stunning.json`` settings it
needs). A new family adds its builder to :data:`BUILDERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from stunning.embedded import (
    RESOLUTION,
    T5_TOKENS,
    VOCABULARY,
    build_micro,
    check_tokenizer_ids,
    clip_config,
    load_tokenizer,
    micro_configs,
)

# --------------------------------------------------------------------------- sd-unet


def sd_unet_configs(vocab_size: int = 512) -> dict[str, dict]:
    """Configs of a tiny SD-1.5-layout model (UNet) of about the micro model's size."""
    return {
        "unet": {
            "sample_size": RESOLUTION // 2,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": [32, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 8,
        },
        "vae": {k: v for k, v in micro_configs(vocab_size)["vae"].items() if "quant_conv" not in k and "_factor" not in k},
        "text_encoder": clip_config(vocab_size, hidden=32, layers=2, heads=4),
    }


def sd_unet_pipeline(seed: int = 0):
    """A randomly initialised SD-1.5-layout `StableDiffusionPipeline` (the sd-unet family)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load_tokenizer()
    cfg = sd_unet_configs(vocab_size=len(tokenizer))
    check_tokenizer_ids(cfg["text_encoder"], tokenizer)
    torch.manual_seed(seed)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**cfg["unet"]), vae=AutoencoderKL(**cfg["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])), tokenizer=tokenizer,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# --------------------------------------------------------------------------- sdxl


def sdxl_configs(vocab_size: int = 512) -> dict[str, dict]:
    """Configs of a tiny SDXL-layout model (32 px).

    Shaped like SDXL base, scaled down: the first down block (and the last up block) has no
    attention, deeper blocks stack more transformer layers (SDXL: 1, 2, 10; here 1, 2), the
    mid block attends, the second text encoder is wider than the first, and the UNet's
    cross-attention width is both encoders' widths together.
    """
    # Two widths, as in SDXL (768 and 1280): single-file loading tells the encoders apart by width.
    te1 = clip_config(vocab_size, hidden=32, layers=2, heads=4)
    te2 = clip_config(vocab_size, hidden=48, layers=2, heads=4)
    time_dim = 8
    return {
        "unet": {
            "sample_size": RESOLUTION // 2,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": [16, 32],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "cross_attention_dim": te1["hidden_size"] + te2["hidden_size"],
            "attention_head_dim": [2, 4],
            "transformer_layers_per_block": [1, 2],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_dim,
            "projection_class_embeddings_input_dim": 6 * time_dim + te2["projection_dim"],
            "norm_num_groups": 8,
        },
        "vae": {**sd_unet_configs(vocab_size)["vae"], "force_upcast": True},
        "text_encoder": te1,
        "text_encoder_2": te2,
    }


def sdxl_pipeline(seed: int = 0):
    """A randomly initialised tiny `StableDiffusionXLPipeline`."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = load_tokenizer()
    cfg = sdxl_configs(vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**cfg["unet"]),
        vae=AutoencoderKL(**cfg["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
        tokenizer_2=load_tokenizer(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


# --------------------------------------------------------------------------- flux

FLUX_T5_TOKENS = 16
FLUX_SETTINGS = {"t5_tokens": FLUX_T5_TOKENS, "resolution": 32, "trained": False}


def flux_t5_tokenizer():
    """A T5 (Unigram, SentencePiece-style) tokenizer over the embedded vocabulary; no download.

    T5's layout: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then whole words of
    :data:`stunning.embedded.VOCABULARY` (scored above single characters, so known words stay
    one token) and every printable ASCII character, so any caption still tokenizes.
    Deterministic: the same ids on every build.
    """
    import string

    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    words = sorted(set(VOCABULARY.split()))
    pieces += [("\u2581" + w, -1.0) for w in words]
    pieces += [(ch, -5.0) for ch in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=FLUX_T5_TOKENS)


def flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A randomly initialised tiny `FluxPipeline` (32 px; save it with :data:`FLUX_SETTINGS`)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, t5_tok = load_tokenizer(), flux_t5_tokenizer()
    clip = clip_config(len(clip_tok), hidden=32, layers=2, heads=4)
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


# --------------------------------------------------------------------------- by family

# family name -> (pipeline builder taking the seed, the stunning.json settings its folder needs)
BUILDERS: dict[str, tuple[Callable[[int], Any], dict | None]] = {
    "sd3": (build_micro, {"t5_tokens": T5_TOKENS, "trained": False}),
    "sd-unet": (sd_unet_pipeline, None),
    "sdxl": (sdxl_pipeline, None),
    "flux": (flux_pipeline, FLUX_SETTINGS),
}


def families() -> list[str]:
    """Names of the families with a tiny build, sorted."""
    return sorted(BUILDERS)


def build_tiny(out_dir: str | Path, family: str = "sd3", seed: int = 0) -> Path:
    """Save a randomly initialised tiny model of `family` (weights from `seed`) to `out_dir`.

    KeyError for an unknown family (listing the known ones); ValueError for a known family
    without a tiny build.
    """
    from stunning.families import get_family, save_model

    get_family(family)  # an unknown name fails with the list of known families
    if family not in BUILDERS:
        raise ValueError(f"no tiny build for family {family!r}; families with one: {families()}")
    builder, settings = BUILDERS[family]
    return save_model(builder(seed), out_dir, settings)


# --------------------------------------------------------------------------- CLIP scorer


def build_clip(out_dir: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a randomly initialised tiny `CLIPModel` + `CLIPProcessor` to `out_dir`.

    The classes, files and processor are those of a real CLIP checkpoint (what
    ``validate.clip_model`` loads), over the embedded tokenizer; its scores mean nothing,
    which is what tests of the scoring path need.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = load_tokenizer()
    text = clip_config(len(tok), hidden=32, layers=2, heads=2)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": image_size, "patch_size": 8, "projection_dim": 32}
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    out = Path(out_dir)
    model.save_pretrained(out)
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(out)
    return out
