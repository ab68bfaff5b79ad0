"""Cheap live previews of a generation: a linear latent-to-RGB map fitted from the model's own VAE.

Decoding every step's latents with the VAE costs about as much as a denoising step, so UIs
preview with a per-pixel linear projection instead ("latent2rgb"): ``rgb = W @ latent + b``
at the latent grid, then upscaled. Other tools ship hand-tuned ``W`` per model; here it is
*fitted* per model, by least squares, from the model's own VAE, so it works for every family
and for any VAE (including the tiny and micro ones, whose latents mean nothing to a
published table):

1. paint a small set of synthetic images in code (flat colours, two-colour gradients, colour
   blocks, shapes on a background; nothing downloaded), at a small size;
2. encode them with the VAE (posterior mean) and normalise the latents the family's way
   (:meth:`Family.latents_from_moments`), which is the space the sampling loop works in
   (scaled/shifted latents: the same ``W`` then applies to the ``on_step`` latents);
3. decode the same latents with the VAE and average-pool the decoded RGB to the latent grid:
   the target is what the VAE would show, not the painted image;
4. solve the (slightly ridge-regularised) least-squares problem for ``W`` (3 x C) and ``b``.

:func:`fit_previewer` does this once per model (fractions of a second for the micro model);
:meth:`LatentPreviewer.image` turns latents into a small PIL image in well under a millisecond.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

__all__ = ["LatentPreviewer", "fit_previewer", "synthetic_images", "until_it_fails", "PREVIEW_PX"]

PREVIEW_PX = 128  # a preview's height is about this (the latent grid upscaled by a whole factor)
FIT_IMAGES = 32
RIDGE = 1e-4  # relative to the mean diagonal of X^T X: keeps a near-dead latent channel from blowing W up


@dataclass
class LatentPreviewer:
    """``rgb = weight @ latent + bias`` per latent pixel, RGB in [-1, 1] (the VAE's image range)."""

    weight: torch.Tensor  # (3, C) float32
    bias: torch.Tensor  # (3,) float32
    fit_s: float = 0.0
    fit_rmse: float = 0.0  # on the fitting set, RGB in [-1, 1]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.weight.shape[1])

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents `(b, C, h, w)` (or `(C, h, w)`) -> RGB `(b, 3, h, w)` float32 in [-1, 1] (clamped)."""
        import torch

        x = latents.detach().to("cpu", torch.float32)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"latents of shape {tuple(latents.shape)}: expected (batch, {self.channels}, h, w), the VAE latent "
                "layout (use Family.preview_latents for packed pipeline latents)"
            )
        b, c, h, w = x.shape
        out = torch.addmm(self.bias[:, None], self.weight, x.permute(1, 0, 2, 3).reshape(c, -1))  # (3, b*h*w)
        return out.reshape(3, b, h, w).permute(1, 0, 2, 3).clamp_(-1.0, 1.0)

    def array(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 RGB `(h, b*w, 3)` at the latent grid: the batch tiled left to right."""
        import torch

        rgb = self.rgb(latents)
        pixels = ((rgb + 1.0) * 127.5).round_().to(torch.uint8)  # [-1, 1] -> [0, 255]
        return pixels.permute(2, 0, 3, 1).reshape(rgb.shape[2], -1, 3).numpy()

    def image(self, latents: torch.Tensor, size: int = PREVIEW_PX) -> Image.Image:
        """A small PIL preview: the latent grid upscaled (nearest) by a whole factor to about `size` px high."""
        from PIL import Image

        arr = self.array(latents)
        h, w = arr.shape[:2]
        scale = max(1, int(size) // max(h, 1))
        img = Image.fromarray(arr, mode="RGB")
        return img if scale == 1 else img.resize((w * scale, h * scale), Image.Resampling.NEAREST)


def synthetic_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """`n` painted RGB images `(n, 3, size, size)` in [-1, 1]: flat colours, gradients, blocks, shapes.

    Deterministic for a seed; a range of colours and edges wide enough that a linear fit
    sees how each latent channel moves with hue and brightness.
    """
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        c0, c1 = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
        kind = i % 4
        if kind == 0:  # flat colour
            img = np.broadcast_to(c0, (size, size, 3))
        elif kind == 1:  # two-colour gradient in a random direction
            a = rng.uniform(0, 2 * np.pi)
            t = (np.cos(a) * (xx - 0.5) + np.sin(a) * (yy - 0.5)) / 1.42 + 0.5
            img = c0 * (1 - t[..., None]) + c1 * t[..., None]
        elif kind == 2:  # a grid of colour blocks
            k = int(rng.integers(2, 5))
            cells = rng.random((k, k, 3), dtype=np.float32)
            idx_y = np.minimum((yy * k).astype(int), k - 1)
            idx_x = np.minimum((xx * k).astype(int), k - 1)
            img = cells[idx_y, idx_x]
        else:  # a disc or box on a background
            cx, cy, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.15, 0.35)
            mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) if rng.random() < 0.5 else (
                (abs(xx - cx) < r) & (abs(yy - cy) < r * 0.7))
            img = np.where(mask[..., None], c1, c0)
        out[i] = img
    return torch.from_numpy(out * 2.0 - 1.0).permute(0, 3, 1, 2).contiguous()


def _fit_size(pipe: Any, family: Any) -> int:
    """Painting size: the model's own (at most 64 px: the VAE is convolutional, the map per pixel)."""
    f = int(getattr(pipe, "vae_scale_factor", 8))
    try:
        res = int(family.resolution(pipe))
    except Exception:  # a family without a fixed resolution: any size works
        res = 64
    size = min(res, 64)
    return max(8 * f, size - size % f)


def fit_previewer(pipe: Any, family: Any, n_images: int = FIT_IMAGES, seed: int = 0,
                  size: int | None = None) -> LatentPreviewer:
    """Fit the model's :class:`LatentPreviewer` from its VAE (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    vae = pipe.vae
    size = int(size or _fit_size(pipe, family))
    pixels = synthetic_images(n_images, size, seed)
    with torch.no_grad():
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        mean = dist.mean
        # std 0: the "sample" is the mean; a local generator leaves the global RNG untouched.
        gen = torch.Generator(device=mean.device).manual_seed(0)
        loop_latents = family.latents_from_moments(pipe, mean, torch.zeros_like(mean), gen)
        decoded = vae.decode(mean).sample
    f = decoded.shape[-1] // mean.shape[-1]
    target = F.avg_pool2d(decoded.float(), f) if f > 1 else decoded.float()
    c = loop_latents.shape[1]
    x = loop_latents.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).reshape(-1, c)
    y = target.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).reshape(-1, 3)
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    gram = x1.T @ x1
    reg = RIDGE * gram.diagonal()[:c].mean() * torch.eye(c + 1, dtype=x.dtype)
    reg[c, c] = 0.0  # the bias is not shrunk
    sol = torch.linalg.solve(gram + reg, x1.T @ y)  # (C+1, 3)
    rmse = float(((x1 @ sol - y) ** 2).mean().sqrt())
    prev = LatentPreviewer(
        weight=sol[:c].T.to(torch.float32).contiguous(),
        bias=sol[c].to(torch.float32).contiguous(),
        fit_s=time.perf_counter() - t0,
        fit_rmse=rmse,
        info={"images": n_images, "size": size, "latent_grid": list(mean.shape[-2:]), "channels": c},
    )
    log.info("latent previewer fitted in %.3f s (%d images at %d px, %d channels, rmse %.3f)",
             prev.fit_s, n_images, size, c, rmse)
    return prev


T = TypeVar("T")


def until_it_fails(preview: Callable[[Any], T]) -> Callable[[Any], T | None]:
    """`preview` that gives None from its first exception on (logged once): a preview is a
    nicety, never a reason to fail the drawing it shows."""
    failed = False

    def guarded(latents: Any) -> T | None:
        nonlocal failed
        if failed:
            return None
        try:
            return preview(latents)
        except Exception:
            failed = True
            log.warning("latent preview failed; drawing without previews", exc_info=True)
            return None

    return guarded
