"""Model families: one self-contained module per family, registered by name.

A family knows how to load its diffusers pipeline from a local folder, encode prompts and
images, compute its training objective, and which modules LoRA targets by default. The
rest of the library talks to models only through :class:`Family`, so adding a family
(SDXL, SD3, FLUX) is adding a module that calls :func:`register`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image


class ModelNotFoundError(FileNotFoundError):
    """A base model folder is missing or incomplete; the message says what to do."""


class Family(Protocol):
    name: str
    default_lora_targets: list[str]

    def load_pipeline(self, path: Path, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline: ...

    def denoiser(self, pipe: DiffusionPipeline) -> torch.nn.Module: ...

    def encode_prompts(self, pipe: DiffusionPipeline, prompts: list[str]) -> torch.Tensor: ...

    def encode_images(self, pipe: DiffusionPipeline, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...

    def training_loss(
        self, pipe: DiffusionPipeline, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor: ...

    def save_lora(self, pipe: DiffusionPipeline, out_dir: Path, metadata: dict[str, str] | None = None) -> Path: ...

    def generate(
        self,
        pipe: DiffusionPipeline,
        prompts: list[str],
        seeds: list[int],
        steps: int,
        guidance_scale: float,
    ) -> list[Image.Image]: ...


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    _REGISTRY[family.name] = family
    return family


def get_family(name: str) -> Family:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r} (base.family); known: {sorted(_REGISTRY)}") from None


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    # Importing a family module registers it; imports stay lazy so `stunning` starts fast.
    from stunning.families import sd_unet  # noqa: F401
