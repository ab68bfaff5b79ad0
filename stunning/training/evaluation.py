"""Validation loss: the training objective on a fixed set with fixed noise, comparable across models."""

from __future__ import annotations

import torch

# The diffusion loss of one batch swings with the drawn timesteps, so the val loss averages
# several noise draws.
VAL_REPEATS = 4


@torch.no_grad()
def evaluate_loss(
    family,
    pipe,
    scheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    seed: int,
    batch_size: int,
    repeats: int = VAL_REPEATS,
) -> float:
    """Mean training objective over a fixed set with fixed noise: comparable across models.

    The same `seed` gives the same noise and timesteps for every model, so the difference
    between two models' values is the difference of the models, not of the draw.
    """
    gen = torch.Generator(device=latents.device).manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(repeats):
        for start in range(0, latents.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            loss = family.training_loss(pipe, latents[sl], cond[sl], gen, scheduler=scheduler)
            n = latents[sl].shape[0]
            total += float(loss) * n
            count += n
    return total / count


def evaluate_buckets(family, pipe, scheduler, buckets, seed: int, batch_size: int) -> float:
    """:func:`evaluate_loss` over several buckets, weighted by their image counts."""
    total = sum(lat.shape[0] for lat, _ in buckets)
    return sum(
        evaluate_loss(family, pipe, scheduler, lat, cond, seed + i, batch_size) * lat.shape[0] / total
        for i, (lat, cond) in enumerate(buckets)
    )
