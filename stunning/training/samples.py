"""Sample images of the adapter being trained: the final ones (to a folder and the tracker) and
intermediate ones every `train.sample_every` steps, generated without disturbing training."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from stunning.config import TrainConfig
from stunning.io import atomic_dir
from stunning.tracking import Tracker

SAMPLE_SEEDS = (0, 1, 2, 3)
SAMPLE_STEPS = 12
SAMPLE_GUIDANCE = 4.0


def sample_prompt(cfg: TrainConfig, style: str) -> str:
    """The sample prompt in the captions' convention (`..., <style> style`), or with DreamBooth's
    instance prompt that prompt (its `{caption}` filled with `train.sample_prompt`)."""
    if cfg.instance_prompt:
        return cfg.instance_prompt.replace("{caption}", cfg.sample_prompt)
    return f"{cfg.sample_prompt}, {style} style"


def write_samples(
    fam, pipe, cfg: TrainConfig, style: str, samples_dir: str | Path | None, seeds: Sequence[int]
) -> Path:
    """Generate the final sample images into `samples_dir/<style>/` (or a temp folder)."""
    prompt = sample_prompt(cfg, style)
    images = fam.generate(pipe, [prompt] * len(seeds), [int(s) for s in seeds], SAMPLE_STEPS, SAMPLE_GUIDANCE)
    target = (
        Path(samples_dir) / style if samples_dir is not None else Path(tempfile.mkdtemp(prefix=f"samples-{style}-"))
    )
    ctx = atomic_dir(target) if samples_dir is not None else contextlib.nullcontext(target)
    with ctx as folder:
        for seed, img in zip(seeds, images, strict=True):
            img.save(Path(folder) / f"seed-{seed}.png")
        (Path(folder) / "prompt.txt").write_text(prompt + "\n")
    return target


def log_intermediate_samples(fam, pipe, cfg: TrainConfig, style: str, step: int, dev, tracker: Tracker) -> None:
    """Samples at `step` to the tracker (`samples/step-<n>/`), without disturbing training.

    Generation uses its own seeded generators; the global RNG (LoRA dropout) is forked so
    that a run with samples trains exactly like one without.
    """
    denoiser = fam.denoiser(pipe)
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), tempfile.TemporaryDirectory(prefix=f"samples-{style}-") as tmp:
        denoiser.eval()
        try:
            folder = write_samples(fam, pipe, cfg, style, tmp, SAMPLE_SEEDS)
        finally:
            denoiser.train()
        tracker.log_artifact(folder, f"samples/step-{step}")


def sampling_kwargs(fam, pipe) -> dict[str, Any]:
    """Pipeline-call arguments a family needs beyond the stock defaults (its T5 token count)."""
    t5 = fam.t5_tokens(pipe)
    return {"max_sequence_length": t5} if t5 is not None else {}
