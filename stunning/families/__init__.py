"""Model families: the contract in :mod:`stunning.families.base`, one self-contained module per family.

A family knows how to load its diffusers pipeline from a local folder, encode prompts and
images, compute its training objective, and which modules LoRA targets by default. The
rest of the library talks to models only through :class:`Family`, so adding a family is
adding a module that subclasses it, defines ``FAMILY = <its instance>`` and is listed in
:data:`FAMILY_MODULES` (or, outside this package, calling :func:`register`).

Only families live in this package (besides ``base``): model sources are in
:mod:`stunning.model_source`, the single-file writer in :mod:`stunning.single_file`, other
tools' LoRA layouts in :mod:`stunning.lora_formats`, tiny test models in :mod:`stunning.tiny`.
"""

from __future__ import annotations

from stunning.families.base import (
    LORA_FILE,
    METADATA_PREFIX,
    PROJECT_FILE,
    Family,
    ModelNotFoundError,
    absent_components,
    check_model_dir,
    complete_model_index,
    image_moments,
    model_settings,
    sample_posterior,
    save_model,
    write_lora_metadata,
)

__all__ = [
    "FAMILY_MODULES", "LORA_FILE", "METADATA_PREFIX", "PROJECT_FILE", "Family", "ModelNotFoundError",
    "absent_components", "available", "check_model_dir", "complete_model_index", "get_family", "image_moments",
    "model_settings", "register", "sample_posterior", "save_model", "write_lora_metadata",
]

# The built-in families, by module of this package; each module defines FAMILY (its instance).
FAMILY_MODULES = ("sd_unet", "sd3", "sdxl", "flux")

_REGISTRY: dict[str, Family] = {}
_builtin_loaded = False


def register(family: Family) -> Family:
    """Register `family` under ``family.name`` (replacing a family of that name); returns it."""
    _REGISTRY[family.name] = family
    return family


def get_family(name: str) -> Family:
    """The family registered as `name`; KeyError listing the known names otherwise."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r} (base.family); known: {sorted(_REGISTRY)}") from None


def available() -> list[str]:
    """Names of every registered family, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    """Import the modules of :data:`FAMILY_MODULES` and register their families, once.

    Lazy (on the first lookup) so `import stunning.families` stays cheap: no torch, no diffusers.
    """
    global _builtin_loaded
    if _builtin_loaded:
        return
    import importlib

    for module_name in FAMILY_MODULES:
        register(importlib.import_module(f"{__name__}.{module_name}").FAMILY)
    _builtin_loaded = True
