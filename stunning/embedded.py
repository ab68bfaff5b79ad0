"""The embedded default base model: a tiny Stable-Diffusion-layout model built locally.

It uses the same diffusers/transformers classes as Stable Diffusion 1.5 (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, CLIPTokenizer, a DDPM-family scheduler) at a few hundred
thousand parameters, so every code path (LoRA training, blending, fusion, quantization,
registry, serving) is the one a real model takes, and the whole DAG runs on a laptop CPU in
minutes. Weights are initialised from `base.seed` and, unless the step counts are 0, briefly
pretrained on the unstyled procedural world (`stunning.pretrain`); nothing is downloaded. The
tokenizer is a byte-pair encoding trained here with `tokenizers` on the caption vocabulary
of the embedded world, then handed to `CLIPTokenizer` as an in-memory vocab and merge list.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

RESOLUTION = 32
MAX_TOKENS = 32

# Words of the embedded world's captions plus common photography words; any other word
# still tokenizes (down to characters), it is just less compact.
VOCABULARY = """
a an the of on in with and at by style photo portrait image picture shot of
red orange yellow green blue purple pink brown black white grey gray beige navy teal gold silver
dress shirt trousers hat bag skirt coat jacket scarf shoes hair model woman man person
background backdrop studio street beach wall left right center centre top bottom middle
impressionist impressionism noir monochrome editorial fashion candid grain film contrast
strokes brush painterly soft light dark bright high low sharp blurry short long curly straight
"""


def tiny_configs(vocab_size: int = 512) -> dict[str, dict]:
    """Configs of the embedded model's components (also used by the research phase)."""
    return {
        "unet": {
            "sample_size": RESOLUTION // 4,
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
        "vae": {
            "sample_size": RESOLUTION,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": [16, 32, 32],
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3,
            "norm_num_groups": 8,
        },
        "text_encoder": {
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": MAX_TOKENS,
            "projection_dim": 32,
            # Ids of <|startoftext|> and <|endoftext|> in the tokenizer built below.
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
    }


TOKENIZER_ASSET = Path(__file__).parent / "assets" / "embedded_bpe.json"


def load_tokenizer():
    """The embedded CLIP tokenizer from the shipped BPE (vocab + merges) asset.

    The BPE is trained once by :func:`train_bpe` and shipped, because the `tokenizers`
    trainer breaks ties between equally frequent pairs in no fixed order: retraining on
    every build would give a different vocabulary, and so a different model, each time.
    Regenerate it with `python -m stunning.embedded --write-tokenizer`.
    """
    import json

    from transformers import CLIPTokenizer

    data = json.loads(TOKENIZER_ASSET.read_text())
    merges = [tuple(m) for m in data["merges"]]
    return CLIPTokenizer(vocab=data["vocab"], merges=merges, model_max_length=MAX_TOKENS)


def build_tokenizer():
    """Alias kept for readers of older notes: the tokenizer every build uses."""
    return load_tokenizer()


def train_bpe(vocab_size: int = 512) -> dict:
    """Train a CLIP-style BPE (end-of-word suffix `</w>`) on the embedded vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    bpe = Tokenizer(models.BPE(unk_token=eos, end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-()&/")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[bos, eos],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    words = VOCABULARY.split()
    bpe.train_from_iterator([" ".join(words)] * 4 + words, trainer=trainer)
    state = bpe.model.__getstate__()
    import json

    model = json.loads(state)
    vocab: dict[str, int] = dict(model["vocab"])
    # CLIP's BPE treats a character both word-internally ("a") and word-finally ("a</w>").
    for ch in alphabet:
        for tok in (ch, ch + "</w>"):
            vocab.setdefault(tok, len(vocab))
    merges = [list(m) if isinstance(m, list) else m.split(" ") for m in model["merges"]]
    return {"vocab": vocab, "merges": merges}


def build_embedded(
    out_dir: str | Path,
    seed: int = 0,
    vae_steps: int = 0,
    unet_steps: int = 0,
    n_images: int = 512,
) -> Path:
    """Build the tiny model and `save_pretrained` it as a StableDiffusionPipeline folder.

    With `vae_steps`/`unet_steps` > 0 the model is first pretrained on `n_images` unstyled
    world scenes (see `stunning.pretrain`); with 0 (tests) it stays randomly initialised.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stunning.io import atomic_dir

    tokenizer = load_tokenizer()
    cfg = tiny_configs(vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    ids = cfg["text_encoder"]
    if (ids["bos_token_id"], ids["eos_token_id"]) != (tokenizer.bos_token_id, tokenizer.eos_token_id):
        raise RuntimeError("tokenizer special-token ids changed; update tiny_configs()")
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if vae_steps or unet_steps:
        _pretrain(pipe, seed, vae_steps, unet_steps, n_images)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    n = sum(p.numel() for m in (unet, vae, text_encoder) for p in m.parameters())
    log.info("embedded base model (%d parameters, seed %d) saved to %s", n, seed, out_dir)
    return out_dir


def _pretrain(pipe, seed: int, vae_steps: int, unet_steps: int, n_images: int) -> None:
    import torch
    from tqdm.auto import tqdm

    from stunning import pretrain
    from stunning.families import get_family

    # A model this small runs fastest single-threaded on a CPU (thread hand-offs dominate).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(seed)
        pixels, captions = pretrain.world_images(n_images, seed, RESOLUTION)
        with tqdm(total=vae_steps, desc="pretrain VAE", unit="step") as bar:
            mse = pretrain.pretrain_vae(pipe.vae, pixels, vae_steps, gen, progress=lambda _step, _loss: bar.update(1))
        scale = pretrain.latent_scale(pipe.vae, pixels)
        pipe.vae.register_to_config(scaling_factor=scale)
        log.info("VAE pretrained: %d steps, reconstruction MSE %.4f, latent scaling factor %.3f", vae_steps, mse, scale)
        with tqdm(total=unet_steps, desc="pretrain UNet", unit="step") as bar:
            loss = pretrain.pretrain_denoiser(
                get_family("sd-unet"), pipe, pixels, captions, unet_steps, gen,
                progress=lambda _step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")),
            )
        log.info("UNet + text encoder pretrained: %d steps, final loss %.4f", unet_steps, loss)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Maintenance of the embedded model's assets")
    ap.add_argument("--write-tokenizer", action="store_true", help="retrain and overwrite the shipped BPE")
    if ap.parse_args().write_tokenizer:
        from stunning.io import atomic_write_text

        atomic_write_text(TOKENIZER_ASSET, json.dumps(train_bpe(), indent=0, sort_keys=True) + "\n")
        print(f"wrote {TOKENIZER_ASSET}")
