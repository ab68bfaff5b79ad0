"""The model-family contract: :class:`Family`, and the model-folder helpers every family uses.

A family knows how to load its diffusers pipeline from a local folder, encode prompts and
images, compute its training objective, save LoRA adapters in its stock layout, sample, and
which modules LoRA targets by default. The rest of the library talks to models only through
the members of :class:`Family` listed here; a family module (``sd_unet``, ``sd3``, ``sdxl``,
``flux``) subclasses it, implements the abstract members and overrides the optional ones it
has (``t5_tokens``, ``samplers``/``set_sampler``, ``encode_prompts_with_grad``). Callers never
probe a family with ``hasattr``: an optional member's default here says "this family has none".

Shapes, throughout: images are NCHW float tensors in [-1, 1]; latents are (N, C, h, w) as the
family's denoiser takes them (scaled/normalised the family's way); prompt conditioning is one
(N, T, D) tensor per batch (families with a pooled vector pack it as one extra token, see the
family modules); a loss is a 0-d tensor.

This module imports neither torch nor diffusers at import time (stages import
:class:`ModelNotFoundError` from :mod:`stunning.families` to report errors cheaply).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from stunning.io import canonicalize_safetensors

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

LORA_FILE = "pytorch_lora_weights.safetensors"  # what `save_lora` writes and stock `load_lora_weights` reads
PROJECT_FILE = "stunning.json"  # optional per-model settings written by this project
METADATA_PREFIX = "stunning."

# on_step(step, total_steps, latents): called by `Family.generate` after each sampling step.
StepCallback = Callable[[int, int, "torch.Tensor"], None]


class ModelNotFoundError(FileNotFoundError):
    """A base model folder is missing or incomplete; the message says what to do."""


class Family(abc.ABC):
    """What every model family provides. One instance per family, registered by name.

    Class attributes a subclass sets (all required):

    - ``name``: the family's name in ``base.family`` (``"sd3"``, ``"sd-unet"``, ...);
    - ``required_components``: component folders a diffusers folder of this family must hold
      (what :func:`check_model_dir` checks, e.g. ``("unet", "vae", ...)``);
    - ``lora_component``: the pipeline attribute of the denoiser (``"unet"`` or ``"transformer"``),
      the component LoRA adapters train;
    - ``lora_components``: every component this family's LoRA files may hold (the denoiser and
      its text encoders), what :meth:`save_lora_layers` accepts;
    - ``default_lora_targets``: module names LoRA targets by default (``train.lora_targets``);
    - ``block_pattern``: a ``str.format`` pattern with ``{i}`` naming the denoiser's i-th block
      (``"transformer_blocks.{i}."``), for block-wise targeting (``train.target_blocks``).

    Optional, with defaults here:

    - ``samplers``: sampler names :meth:`set_sampler` accepts (``validate.sampler``); empty: the
      family samples only with the model's own scheduler.
    """

    name: ClassVar[str]
    required_components: ClassVar[tuple[str, ...]]
    lora_component: ClassVar[str]
    lora_components: ClassVar[tuple[str, ...]]
    default_lora_targets: ClassVar[list[str]]
    block_pattern: ClassVar[str]
    samplers: ClassVar[tuple[str, ...]] = ()

    _REQUIRED_ATTRIBUTES: ClassVar[tuple[str, ...]] = (
        "name", "required_components", "lora_component", "lora_components", "default_lora_targets", "block_pattern",
    )

    def __init__(self) -> None:
        missing = [a for a in self._REQUIRED_ATTRIBUTES if not hasattr(self, a)]
        if missing:
            raise TypeError(f"{type(self).__name__} does not set the Family attribute(s) {missing}")

    # ------------------------------------------------------------------ loading

    @abc.abstractmethod
    def pipeline_class(self) -> type[DiffusionPipeline]:
        """The stock diffusers pipeline class of this family (``StableDiffusion3Pipeline``, ...)."""

    @abc.abstractmethod
    def load_pipeline(self, path: Path, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
        """The pipeline of the local diffusers folder `path` on `device` in `dtype`, progress bar off.

        Raises :class:`ModelNotFoundError` when the folder is missing or incomplete.
        """

    @abc.abstractmethod
    def denoiser(self, pipe: DiffusionPipeline) -> torch.nn.Module:
        """The module LoRA trains (the UNet or the transformer; ``getattr(pipe, lora_component)``)."""

    @abc.abstractmethod
    def frozen_modules(self, pipe: DiffusionPipeline) -> list[torch.nn.Module]:
        """Every module whose weights stay frozen while an adapter trains (denoiser, VAE, text encoders)."""

    @abc.abstractmethod
    def resolution(self, pipe: DiffusionPipeline) -> int:
        """The square sampling size in pixels the model was made for (32 for the tiny models)."""

    def t5_tokens(self, pipe: DiffusionPipeline) -> int | None:
        """T5 tokens per prompt (the pipeline's ``max_sequence_length``), or None: no T5 encoder.

        A family with a T5 encoder returns the count the model was trained with (from the
        folder's ``stunning.json``, else the stock default); callers pass it to every pipeline
        call as ``max_sequence_length`` so training and sampling see the same context.
        """
        return None

    # ------------------------------------------------------------------ encoding

    @abc.abstractmethod
    def encode_prompts(self, pipe: DiffusionPipeline, prompts: list[str]) -> torch.Tensor:
        """Prompt conditioning, (N, T, D), without gradients: what :meth:`training_loss` takes as `cond`."""

    def encode_prompts_with_grad(self, pipe: DiffusionPipeline, prompts: list[str]) -> torch.Tensor:
        """:meth:`encode_prompts` with gradients through the text encoders (joint pretraining).

        Default: not available (the micro model's pretraining uses the ``sd3`` family's).
        """
        raise NotImplementedError(f"the {self.name} family has no differentiable prompt encoding")

    def encode_images(self, pipe: DiffusionPipeline, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pixels in [-1, 1], NCHW → latents (N, C, H/f, W/f): a sample of the VAE posterior,
        normalised by :meth:`latents_from_moments`. No gradients."""
        import torch

        with torch.no_grad():
            return self.latents_from_moments(pipe, *image_moments(pipe, pixels), generator)

    @abc.abstractmethod
    def latents_from_moments(
        self, pipe: DiffusionPipeline, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Latents from the VAE posterior's (mean, std) (what the encoding cache stores), sampled with
        `generator` and scaled/normalised the family's way; same shape as `mean`."""

    # ------------------------------------------------------------------ training

    @abc.abstractmethod
    def noise_scheduler(self, pipe: DiffusionPipeline) -> Any:
        """The scheduler whose config drives :meth:`training_loss` (a DDPM scheduler for UNets,
        the flow-matching scheduler for transformers). Built once per run and passed back in."""

    @abc.abstractmethod
    def training_loss(
        self,
        pipe: DiffusionPipeline,
        latents: torch.Tensor,
        cond: torch.Tensor,
        generator: torch.Generator,
        scheduler: Any = None,
    ) -> torch.Tensor:
        """The family's training objective on a batch: a 0-d loss tensor (mean over the batch).

        `latents` (N, C, h, w) as :meth:`encode_images` returns them, `cond` (N, T, D) as
        :meth:`encode_prompts` returns it; noise and timesteps are drawn from `generator`.
        `scheduler` defaults to :meth:`noise_scheduler`.
        """

    # ------------------------------------------------------------------ LoRA files

    def lora_layers(self, pipe: DiffusionPipeline) -> dict[str, dict[str, torch.Tensor]]:
        """The denoiser's active adapter, ``{lora_component: {key: float32 CPU tensor}}``, keyed the way
        the family's stock loader reads it.

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

    def save_lora(self, pipe: DiffusionPipeline, out_dir: Path, metadata: dict[str, Any] | None = None) -> Path:
        """Save the active adapter to ``out_dir/pytorch_lora_weights.safetensors`` in the family's
        diffusers LoRA layout (plus ``stunning.*`` safetensors metadata, if given); returns the file.
        Stock ``pipeline_class().load_lora_weights(out_dir)`` loads it."""
        from pathlib import Path

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        denoiser = getattr(pipe, self.lora_component)
        lora_config = denoiser.peft_config[denoiser.active_adapters()[0]]
        self.save_lora_layers(out_dir, self.lora_layers(pipe), {self.lora_component: lora_config.to_dict()})
        path = out_dir / LORA_FILE
        if metadata:
            write_lora_metadata(path, metadata)
        return path

    def save_lora_layers(self, out_dir: Path, layers: dict, configs: dict) -> None:
        """Write `layers` (``{component: {key: tensor}}``, components of :attr:`lora_components`) with
        their PEFT `configs` (``{component: LoraConfig dict}``) as the family's stock LoRA file."""
        from pathlib import Path

        unknown = sorted(set(layers) - set(self.lora_components))
        if unknown:
            raise ValueError(f"{self.name} LoRA files hold {list(self.lora_components)} layers, not {unknown}")
        kwargs = {f"{c}_lora_layers": v for c, v in layers.items()}
        kwargs.update({f"{c}_lora_adapter_metadata": canonical_lora_config(v) for c, v in configs.items()})
        self.pipeline_class().save_lora_weights(Path(out_dir), safe_serialization=True, **kwargs)
        canonicalize_safetensors(Path(out_dir) / LORA_FILE)

    # ------------------------------------------------------------------ sampling

    def set_sampler(self, pipe: DiffusionPipeline, sampler: str) -> None:
        """Swap the pipeline's scheduler for one of :attr:`samplers`; ValueError for any other name.

        Default: the family has no sampler choice (``samplers`` is empty), so every name is refused.
        """
        raise ValueError(f"unknown sampler {sampler!r}: the {self.name} family has no sampler choice")

    @abc.abstractmethod
    def generate(
        self,
        pipe: DiffusionPipeline,
        prompts: list[str],
        seeds: list[int],
        steps: int,
        guidance_scale: float,
        *,
        negative_prompts: list[str] | None = None,
        on_step: StepCallback | None = None,
    ) -> list[Image.Image]:
        """One PIL image per (prompt, seed) at :meth:`resolution`, seeded per image (reproducible).

        `negative_prompts` (one per prompt; None or "" is the empty negative prompt, which is what
        classifier-free guidance uses anyway, so None and [""] draw the same pixels) steer away
        from what they describe. `on_step(step, total, latents)` is called after every sampling
        step with the current latents in the family's image layout `(batch, channels, h, w)`
        (see :meth:`step_kwargs`); it may raise to cancel the generation (the exception
        propagates out of this call, no image is returned).
        """

    def step_kwargs(self, pipe: DiffusionPipeline, on_step: StepCallback | None, steps: int) -> dict[str, Any]:
        """The diffusers `callback_on_step_end` arguments that call `on_step` after each step.

        Families whose pipelines keep latents in another layout (FLUX packs 2x2 patches)
        override :meth:`preview_latents` to hand `on_step` the unpacked `(b, c, h, w)` form.
        """
        if on_step is None:
            return {}

        def callback(pipeline, step_index, timestep, callback_kwargs):
            on_step(int(step_index) + 1, int(steps), self.preview_latents(pipe, callback_kwargs["latents"]))
            return {}

        return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}

    def preview_latents(self, pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's in-loop latents as `(batch, channels, h, w)` (the VAE latent layout)."""
        return latents


def negatives_for(negative_prompts: list[str] | None, prompts: list[str]) -> list[str] | None:
    """One negative prompt per prompt, or None when all are empty.

    None lets each pipeline use its own unconditional input (SDXL zeroes it rather than
    encoding ""), so an empty negative prompt draws exactly what no negative prompt draws.
    """
    if negative_prompts is None:
        return None
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts: give one per prompt")
    negatives = [str(n or "") for n in negative_prompts]
    return negatives if any(negatives) else None


# --------------------------------------------------------------------------- model folders


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


def model_settings(path: Path) -> dict:
    """The model folder's ``stunning.json`` (written for models this project builds), or {}.

    Holds what the stock diffusers config cannot, e.g. ``t5_tokens``: how many T5 tokens a
    tiny or micro model was trained with.
    """
    import json
    from pathlib import Path

    f = Path(path) / PROJECT_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def save_model(pipe, out_dir: str | Path, settings: dict | None = None) -> Path:
    """`save_pretrained` into `out_dir` atomically, plus the project's `stunning.json` settings."""
    import json
    from pathlib import Path

    from stunning.io import atomic_dir

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        complete_model_index(tmp, type(pipe))
        if settings is not None:
            (tmp / PROJECT_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return out_dir


# --------------------------------------------------------------------------- shared encoding steps


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


# --------------------------------------------------------------------------- LoRA file metadata


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
    canonicalize_safetensors(tmp)
    os.replace(tmp, lora_file)


def canonical_lora_config(config: dict[str, Any]) -> dict[str, Any]:
    """A PEFT LoraConfig dict whose serialisation is the same in every process: sets (PEFT keeps
    `target_modules` as a set, iterated in the process's string-hash order) and the target list
    become sorted lists. Byte-identical files for the same inputs keep DVC from rerunning."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, (set, frozenset)) or (key in ("target_modules", "exclude_modules")
                                                   and isinstance(value, (list, tuple))):
            value = sorted(value, key=str)
        out[key] = value
    return out


def json_dumps(value: object) -> str:
    import json

    return json.dumps(value, sort_keys=True)
