"""Short pretraining of the embedded base model on the unstyled procedural world.

A randomly initialised VAE decodes every latent to the same noise, so no adapter could move
generated images towards a style and validation would judge noise. Before it is saved, the
embedded model therefore learns (i) to auto-encode images of the style-free scene world
(`stunning.data.sample.render_clean`) with generic photometric augmentation (grain,
saturation and contrast jitter, so grainy or monochrome images are representable), and (ii)
to denoise those scenes conditioned on their captions (DDPM objective through the family;
10% empty captions so classifier-free guidance has an unconditional branch). It never sees
the styled data sets: styles are what the LoRA adapters add.

This is deliberately brief (minutes on a CPU); a properly trained micro model is separate
work. Everything is seeded, so a rebuild gives the same weights on the same machine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CFG_DROPOUT = 0.1


def world_images(n: int, seed: int, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """`n` style-free scenes as NCHW pixels in [-1, 1] and their captions (no style words)."""
    from PIL import Image

    from stunning.data.sample import draw_scene, render_clean

    rng = np.random.default_rng(seed)
    pixels, captions = [], []
    for i in range(n):
        scene = draw_scene(rng, i)
        arr = (render_clean(scene) * 255).round().astype(np.uint8)
        img = Image.fromarray(arr).resize((resolution, resolution), Image.Resampling.LANCZOS)
        pixels.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        captions.append(scene.caption("plain").removesuffix(", plain style"))
    return torch.stack(pixels), captions


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Generic photometric jitter: grain of random strength, saturation 0-1.6x, contrast."""
    b = x.shape[0]
    grain = torch.rand(b, 1, 1, 1, generator=gen) * 0.3
    x = x + grain * torch.randn(x.shape, generator=gen)
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * (torch.rand(b, 1, 1, 1, generator=gen) * 1.6)
    return (x * (0.6 + 0.9 * torch.rand(b, 1, 1, 1, generator=gen))).clamp(-1, 1)


def pretrain_vae(vae, pixels: torch.Tensor, steps: int, gen: torch.Generator, batch: int = 16,
                 progress: Callable[[int, float], None] | None = None) -> float:
    """Train the VAE to reconstruct (augmented) world images; return held-in pixel MSE in [0, 1]."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for step in range(steps):
        x = augment(pixels[torch.randint(0, len(pixels), (batch,), generator=gen)], gen)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        # A tiny KL weight keeps the latent space smooth without blurring reconstructions.
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            progress(step, float(loss.detach()))
    vae.eval()
    with torch.no_grad():
        x = pixels[:64]
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        return float(F.mse_loss((recon + 1) / 2, (x + 1) / 2))


@torch.no_grad()
def latent_scale(vae, pixels: torch.Tensor) -> float:
    """1/std of the latents, the `scaling_factor` that gives the denoiser unit-variance inputs."""
    lat = torch.cat([vae.encode(pixels[i : i + 64]).latent_dist.mean for i in range(0, len(pixels), 64)])
    return float(1.0 / lat.std())


def pretrain_denoiser(family, pipe, pixels: torch.Tensor, captions: list[str], steps: int, gen: torch.Generator,
                      batch: int = 16, progress: Callable[[int, float], None] | None = None) -> float:
    """Train the UNet and text encoder on captioned world latents; return the mean final loss."""
    with torch.no_grad():
        latents = torch.cat(
            [pipe.vae.encode(pixels[i : i + 64]).latent_dist.mean for i in range(0, len(pixels), 64)]
        ) * pipe.vae.config.scaling_factor
    tok = pipe.tokenizer
    ids = tok(captions + [""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    empty = ids[-1:]
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    pipe.unet.train()
    pipe.text_encoder.train()
    opt = torch.optim.AdamW(params, lr=1e-3)
    scheduler = family.noise_scheduler(pipe)
    recent: list[float] = []
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        batch_ids = ids[idx]
        drop = torch.rand(batch, generator=gen) < CFG_DROPOUT
        batch_ids = torch.where(drop[:, None], empty.expand_as(batch_ids), batch_ids)
        cond = pipe.text_encoder(batch_ids)[0]
        loss = family.training_loss(pipe, latents[idx], cond, gen, scheduler=scheduler)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent = (recent + [float(loss.detach())])[-50:]
        if progress:
            progress(step, float(loss.detach()))
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return float(np.mean(recent)) if recent else float("nan")
