"""Latents and prompt embeddings of a curated set, computed once before the loop, and the check
that its (bucket) image sizes suit the model.

The VAE and the text encoder are frozen, so each image's latents and each caption's
embedding are the same on every step: they are encoded here (optionally through the on-disk
:class:`~stunning.training.cache.EncodingCache`) and each step then costs one denoiser
forward/backward. With aspect-ratio buckets every bucket is encoded on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from stunning.training.cache import EncodingCache
from stunning.training.dataset import CuratedDataset, DatasetError

ENCODE_BATCH = 16


def encode_dataset(
    family,
    pipe,
    dataset: CuratedDataset,
    seed: int,
    cache: EncodingCache | None = None,
    *,
    indices: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    caption_fn: Callable[[str], str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, prompt embeddings) of every item (or of `indices`), in dataset order.

    The VAE posterior is sampled once per image with a generator seeded from `seed` (or the
    given `generator`, shared across calls), so the tensors are the same on every run and on
    resume. With `cache`, each image's posterior moments and each caption's embedding are read
    from disk when their content was seen before (see `stunning.training.cache`); the sampled
    latents are identical either way. `caption_fn` maps each caption first (DreamBooth's
    instance prompt).
    """
    gen = generator if generator is not None else torch.Generator(device="cpu").manual_seed(seed)
    order = list(range(len(dataset))) if indices is None else list(indices)
    latents, conds = [], []
    for start in range(0, len(order), ENCODE_BATCH):
        items = [dataset[i] for i in order[start:start + ENCODE_BATCH]]
        pixels = torch.stack([it["pixels"] for it in items])
        captions = [caption_fn(it["caption"]) if caption_fn else it["caption"] for it in items]
        if cache is None:
            latents.append(family.encode_images(pipe, pixels, gen))
            conds.append(family.encode_prompts(pipe, captions))
            continue
        moments = [_cached(cache, "latent", cache.pixels_key(px), lambda px=px: _moments(pipe, px)) for px in pixels]
        mean = torch.stack([m for m, _ in moments]).to(pipe.vae.device)
        std = torch.stack([s for _, s in moments]).to(pipe.vae.device)
        latents.append(family.latents_from_moments(pipe, mean, std, gen))
        conds.append(torch.stack([
            _cached(cache, "prompt", cache.text_key(c, family.name), lambda c=c: family.encode_prompts(pipe, [c])[0])
            for c in captions
        ]).to(pipe.text_encoder.device))
    return torch.cat(latents), torch.cat(conds)


def encode_buckets(
    family, pipe, dataset: CuratedDataset, seed: int, cache: EncodingCache | None = None,
    caption_fn: Callable[[str], str] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(latents, conditioning) per aspect-ratio bucket (one entry for a single-size set).

    Buckets are encoded in size order with one generator, so a single-size set gives exactly
    what :func:`encode_dataset` gives.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [
        encode_dataset(family, pipe, dataset, seed, cache, indices=idx, generator=gen, caption_fn=caption_fn)
        for idx in dataset.buckets().values()
    ]


def _moments(pipe, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from stunning.families import image_moments

    mean, std = image_moments(pipe, pixels[None])
    return mean[0].cpu(), std[0].cpu()


def _cached(cache: EncodingCache, kind: str, key: str, compute):
    value = cache.get(kind, key)
    if value is None:
        value = compute()
        value = tuple(v.detach().cpu() for v in value) if isinstance(value, tuple) else value.detach().cpu()
        cache.put(kind, key, value)
    return value


def size_multiple(fam, pipe) -> int:
    """What every image side must be a multiple of for this model: the VAE's downsampling factor
    times the denoiser's patch size, times 2 where the pipeline packs 2x2 latent patches (FLUX);
    for a UNet times its own downsampling (2 per down block but the last), so that no level
    of it has to resample a skip connection to an odd size.

    Real models: 16 for SD3 and FLUX, 64 for SD 1.x, 32 for SDXL; the embedded 32-px models: 4.
    """
    factor = int(getattr(pipe, "vae_scale_factor", None) or 8)
    config = dict(getattr(fam.denoiser(pipe), "config", {}) or {})
    patch = config.get("patch_size") or 1
    factor *= patch if isinstance(patch, int) else 1
    down = config.get("down_block_types")
    if isinstance(down, list | tuple) and down:
        factor *= 2 ** (len(down) - 1)
    if hasattr(type(pipe), "_pack_latents"):
        factor *= 2
    return factor


def check_bucket_sizes(fam, pipe, sizes, where: str) -> None:
    """Raise :class:`DatasetError` naming the sizes that this model cannot train on."""
    multiple = size_multiple(fam, pipe)
    bad = sorted({(w, h) for w, h in sizes if w % multiple or h % multiple})
    if bad:
        raise DatasetError(
            f"{where}: image size(s) {', '.join(f'{w}x{h}' for w, h in bad)} are not multiples of {multiple}, "
            f"which the {fam.name} model needs (VAE factor x patch size; for a UNet x its downsampling). "
            f"Set data.bucket_step to a multiple of {multiple} (and data.resolution too) and re-run ingest and curation."
        )
