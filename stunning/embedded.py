"""The embedded default base model: a micro text-to-image model trained by the project.

The micro model is a Stable Diffusion 3 layout (the `sd3` family): an MMDiT
`SD3Transformer2DModel` trained with flow matching, an `AutoencoderKL`, and two
`CLIPTextModelWithProjection` text encoders over a CLIP tokenizer whose byte-pair encoding
was trained here on the caption vocabulary (no T5: SD3 allows dropping it). It is small
enough to ship (``stunning/assets/micro``, < 20 MB) and fast enough for a CPU, and because it
is made of the same diffusers classes as a real SD3 model, LoRA training, blending,
quantization, export and registry code run exactly as they would on a real one.

`stunning.pretrain` trains it from scratch on the unstyled procedural world
(`stunning.data.sample.render_clean`), never showing it the colour/garment pairs in
:data:`HELD_OUT_PAIRS`, so prompt adherence can be measured on combinations it never saw.
The pipeline's `base_model` stage installs the shipped weights into ``models/embedded``.

Randomly initialised tiny models of every family (test and benchmark stand-ins, the ``sd3``
one of this micro model's architecture) are built by :mod:`stunning.tiny`, not here.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

RESOLUTION = 32
MAX_TOKENS = 24
T5_TOKENS = 0  # no T5 encoder, and no zero-padding tokens in its place (see families/sd3.py)
SHIPPED = Path(__file__).parent / "assets" / "micro"

# (garment, colour) pairs the micro model never sees during pretraining.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("dress", "green"),
    ("shirt", "orange"),
    ("trousers", "yellow"),
    ("hat", "purple"),
    ("bag", "pink"),
)

# Words of the embedded world's captions plus common photography words; any other word
# still tokenizes (down to characters), it is just less compact.
VOCABULARY = """
a an the of on in with and at by style photo portrait image picture shot of pair
red orange yellow green blue purple pink brown black white grey gray beige navy teal gold silver
dress shirt trousers hat bag skirt coat jacket scarf shoes hair model woman man person
background backdrop studio street beach wall left right center centre top bottom middle
impressionist impressionism noir monochrome editorial fashion candid grain film contrast
strokes brush painterly soft light dark bright high low sharp blurry short long curly straight
"""


# 4 channels at f=2: 8 channels were tried and reconstructed the brush texture *worse* in
# the same training time (measured: distance floor 0.064 vs 0.049 on the impressionist set).
LATENT_CHANNELS = 4


def micro_configs(vocab_size: int = 512) -> dict[str, dict]:
    """Configs of the micro model's components (also sized by the research phase)."""
    return {
        "transformer": {
            "sample_size": RESOLUTION // 2,
            "patch_size": 2,  # 16x16 latents in 2x2 patches: 64 tokens
            "in_channels": LATENT_CHANNELS,
            "out_channels": LATENT_CHANNELS,
            "num_layers": 6,
            "attention_head_dim": 32,
            "num_attention_heads": 4,
            "joint_attention_dim": 96,  # 64 (text_encoder) + 32 (text_encoder_2)
            "caption_projection_dim": 128,
            "pooled_projection_dim": 96,
            "pos_embed_max_size": RESOLUTION // 2,
        },
        "vae": {
            "sample_size": RESOLUTION,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": LATENT_CHANNELS,
            "layers_per_block": 1,
            # One downsampling (32 px -> 4x16x16): a 4x8x8 latent could not hold the grain and
            # brush strokes the style adapters must reproduce (measured: it halved the grain).
            "block_out_channels": [24, 48],
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "norm_num_groups": 8,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            # SD3 normalises latents as (z - shift) * scale; measured after VAE training.
            "shift_factor": 0.0,
            "scaling_factor": 1.0,
        },
        "text_encoder": clip_config(vocab_size, hidden=64, layers=3, heads=4),
        "text_encoder_2": clip_config(vocab_size, hidden=32, layers=2, heads=2),
    }


def clip_config(vocab_size: int, hidden: int, layers: int, heads: int) -> dict:
    """A `CLIPTextConfig` dict over the embedded tokenizer (its special-token ids, :data:`MAX_TOKENS`)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": MAX_TOKENS,
        "projection_dim": hidden,
        # Ids of <|startoftext|> and <|endoftext|> in the shipped tokenizer.
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
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


def check_tokenizer_ids(cfg: dict, tokenizer) -> None:
    """RuntimeError unless `tokenizer`'s special-token ids are those :func:`clip_config` assumes."""
    if (cfg["bos_token_id"], cfg["eos_token_id"]) != (tokenizer.bos_token_id, tokenizer.eos_token_id):
        raise RuntimeError("tokenizer special-token ids changed; update micro_configs()")


def build_micro(seed: int = 0):
    """A randomly initialised micro model as a `StableDiffusion3Pipeline` (weights from `seed`)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = load_tokenizer()
    cfg = micro_configs(vocab_size=len(tokenizer))
    check_tokenizer_ids(cfg["text_encoder"], tokenizer)
    torch.manual_seed(seed)
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**cfg["transformer"]),
        vae=AutoencoderKL(**cfg["vae"]),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder"])),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
        tokenizer_2=load_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
    )


class EmbeddedModelMissing(FileNotFoundError):
    """The shipped micro-model weights are not in the installed package."""


def install_embedded(out_dir: str | Path, source: Path = SHIPPED) -> Path:
    """Copy the shipped, trained micro model to `out_dir` (atomically)."""
    from stunning.io import atomic_dir

    if not (source / "model_index.json").is_file():
        raise EmbeddedModelMissing(
            f"the micro model's weights are missing from {source}. They ship with the project; restore them "
            "with `git checkout -- stunning/assets/micro`, or retrain them (about 40 minutes on a laptop CPU) "
            "with `python -m stunning.pretrain --out stunning/assets/micro`."
        )
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    log.info("embedded micro model installed from %s to %s", source, out_dir)
    return out_dir


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Maintenance of the embedded model's assets")
    ap.add_argument("--write-tokenizer", action="store_true", help="retrain and overwrite the shipped BPE")
    if ap.parse_args().write_tokenizer:
        from stunning.io import atomic_write_text

        atomic_write_text(TOKENIZER_ASSET, json.dumps(train_bpe(), indent=0, sort_keys=True) + "\n")
        print(f"wrote {TOKENIZER_ASSET}")
