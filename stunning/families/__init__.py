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


def check_model_dir(path: Path, required: tuple[str, ...] | list[str]) -> None:
    """Raise :class:`ModelNotFoundError` naming what is missing in a diffusers folder and how to get it."""
    import json
    from pathlib import Path

    path = Path(path)
    hint = (
        "Set base.path in params.yaml to a local diffusers folder (one saved with "
        "`save_pretrained`, or a snapshot folder in your Hugging Face cache), or set "
        "base.source: embedded to use the project's micro model (`dvc repro base_model`)."
    )
    if not path.is_dir():
        raise ModelNotFoundError(f"base model folder {path} does not exist. {hint}")
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(f"{path}/model_index.json is missing: {path} is not a diffusers folder. {hint}")
    index = json.loads((path / "model_index.json").read_text())
    missing = [c for c in required if c not in index or not (path / c).is_dir()]
    if missing:
        raise ModelNotFoundError(f"{path} lacks the component folder(s) {missing}. {hint}")


def complete_model_index(folder: Path, pipeline_class) -> None:
    """Record absent optional components (e.g. SD3 without T5) as ``[null, null]`` in model_index.json.

    `save_pretrained` leaves components that are ``None`` out of the index, and the stock
    `from_pretrained` then refuses the folder unless the caller passes them; with explicit
    nulls it loads them as ``None`` by itself.
    """
    import inspect
    import json
    from pathlib import Path

    index_file = Path(folder) / "model_index.json"
    index = json.loads(index_file.read_text())
    expected = [p for p in inspect.signature(pipeline_class.__init__).parameters if p != "self"]
    missing = [name for name in expected if name not in index]
    if missing:
        index.update({name: [None, None] for name in missing})
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def absent_components(folder: Path) -> dict[str, None]:
    """``{name: None}`` for components model_index.json records as null (pass them to `from_pretrained`).

    Stock diffusers needs absent non-optional components named explicitly, as in
    ``StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)``.
    """
    import json
    from pathlib import Path

    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {k: None for k, v in index.items() if isinstance(v, list) and v and v[0] is None}


PROJECT_FILE = "stunning.json"  # optional per-model settings written by this project


def model_settings(path: Path) -> dict:
    """The model folder's ``stunning.json`` (written for models this project builds), or {}.

    Holds what the stock diffusers config cannot, e.g. ``t5_tokens``: how many T5 tokens a
    tiny or micro model was trained with.
    """
    import json
    from pathlib import Path

    f = Path(path) / PROJECT_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def image_moments(pipe, pixels):
    """(mean, std) of the VAE posterior for pixels in [-1, 1], NCHW (what the encoding cache stores)."""
    import torch

    with torch.no_grad():
        dist = pipe.vae.encode(pixels.to(device=pipe.vae.device, dtype=pipe.vae.dtype)).latent_dist
    return dist.mean, dist.std


def sample_posterior(mean, std, generator):
    """A posterior sample drawn exactly as diffusers' ``DiagonalGaussianDistribution.sample`` does."""
    from diffusers.utils.torch_utils import randn_tensor

    return mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


class LoraSavingMixin:
    """Saving a denoiser's active PEFT adapter in the diffusers LoRA layout of the family.

    A family sets `lora_component` (the denoiser's pipeline attribute), `lora_components`
    (what its LoRA files may hold) and `pipeline_class()`; stock `load_lora_weights` of
    that pipeline class then loads what this saves.
    """

    lora_component: str
    lora_components: tuple[str, ...]

    def lora_layers(self, pipe) -> dict:
        """The denoiser's active adapter, keyed the way the family's stock loader reads it.

        UNet adapters get the diffusers names (``to_q.lora.down``) that the diffusers UNet
        scripts save. Transformer adapters (sd3, flux) keep PEFT's own names
        (``to_q.lora_A``): the sd3/flux loaders silently skip attention layers under the
        UNet names, so a stock pipeline would load such a file without them.
        """
        import torch
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(getattr(pipe, self.lora_component))
        if self.lora_component == "unet":
            layers = convert_state_dict_to_diffusers(layers)
        return {self.lora_component: {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}}

    def save_lora(self, pipe, out_dir, metadata=None):
        """Save the active adapter (plus ``stunning.*`` safetensors metadata, if given)."""
        from pathlib import Path

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        denoiser = getattr(pipe, self.lora_component)
        lora_config = denoiser.peft_config[denoiser.active_adapters()[0]]
        self.save_lora_layers(out_dir, self.lora_layers(pipe), {self.lora_component: lora_config.to_dict()})
        path = out_dir / "pytorch_lora_weights.safetensors"
        if metadata:
            write_lora_metadata(path, metadata)
        return path

    def save_lora_layers(self, out_dir, layers: dict, configs: dict) -> None:
        from pathlib import Path

        unknown = sorted(set(layers) - set(self.lora_components))
        if unknown:
            raise ValueError(f"{self.name} LoRA files hold {list(self.lora_components)} layers, not {unknown}")
        kwargs = {f"{c}_lora_layers": v for c, v in layers.items()}
        kwargs.update({f"{c}_lora_adapter_metadata": v for c, v in configs.items()})
        self.pipeline_class().save_lora_weights(Path(out_dir), safe_serialization=True, **kwargs)


METADATA_PREFIX = "stunning."


def write_lora_metadata(lora_file: Path, metadata: dict[str, object]) -> None:
    """Add ``stunning.<key>`` entries to a LoRA safetensors file's metadata (rewritten atomically).

    Tools that list adapters (ComfyUI, webui, `safetensors` itself) show this header without
    loading the tensors: base model, rank, alpha, trigger words, training hash.
    """
    import os
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import save_file

    lora_file = Path(lora_file)
    with safe_open(str(lora_file), framework="pt") as f:
        header = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    header.update({f"{METADATA_PREFIX}{k}": v if isinstance(v, str) else json_dumps(v) for k, v in metadata.items()})
    tmp = lora_file.with_name(lora_file.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, lora_file)


def json_dumps(value: object) -> str:
    import json

    return json.dumps(value, sort_keys=True)


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


# Modules of this package that are helpers, not families.
_NOT_FAMILIES = frozenset({"source", "formats"})


def _load_builtin() -> None:
    """Import every family module of this package; importing one registers it.

    Discovery instead of a fixed list: adding a family is adding a module. Imports stay
    lazy (on the first lookup) so `import stunning` starts fast.
    """
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name not in _NOT_FAMILIES:
            importlib.import_module(f"{__name__}.{info.name}")
