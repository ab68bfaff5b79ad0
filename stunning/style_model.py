"""A registered style model as a Python object: :class:`StyleModel`, and the request it answers.

:class:`StyleModel` is the one loading and generation path for a registered model: it loads
the base pipeline (bundled in the model's artifacts, or the external folder its manifest
names) with every style adapter and blend attached as named LoRA adapters, and generates one
image per request (:class:`GenerateRequest`) with the chosen adapter active. The MLflow pyfunc
wrapper (`stunning.registry.StunningStyleModel`) and the HTTP server (`stunning.serve`) both
use it, so `mlflow models serve` and `stunning serve` return the same pixels for the same
request. Both import this module; it imports neither (nor MLflow).

Beyond one adapter per request, a request may blend any of the model's styles at request time
(``styles={"noir": 0.7, "impressionist": -0.3}``): the already-loaded PEFT adapters are
activated together with those weights (no reload; switching takes milliseconds), which is the
same weighted sum of LoRA deltas an offline blend (:func:`stunning.blend.blend_adapters`)
bakes into one file. A request may also pick a sampler (restored afterwards), a negative
prompt, and a batch of images (seeds ``seed, seed+1, ...``); ``on_step`` sees the latents
after every step and :meth:`StyleModel.preview` turns them into a small RGB preview.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stunning.families.base import LORA_FILE

if TYPE_CHECKING:
    from PIL import Image

    from stunning.families import Family
    from stunning.families.base import StepCallback
    from stunning.studio.preview import LatentPreviewer

log = logging.getLogger(__name__)

__all__ = [
    "LORA_FILE", "MANIFEST_NAME", "MAX_BATCH", "MAX_BLEND_STYLES", "MAX_STYLE_WEIGHT", "GenerateRequest",
    "ModelLoadError", "StyleModel", "UnknownAdapterError", "png_bytes",
]

MANIFEST_NAME = "stunning_model.json"  # the registered model's manifest artifact
MAX_BLEND_STYLES = 8  # styles one request-time blend may mix
MAX_STYLE_WEIGHT = 2.0  # |weight| of a style in a request-time blend
MAX_BATCH = 4  # images per request
MAX_NEGATIVE_CHARS = 1000


class GenerateRequest(BaseModel):
    """One generation request (the HTTP body of `POST /generate` and one pyfunc input row)."""

    # allow_inf_nan=False: NaN and ±Infinity (which Python's JSON parser accepts) are refused
    # by validation (HTTP 422) instead of reaching the sampler.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(..., min_length=1, max_length=2000, description="text prompt")
    style: str | None = Field(
        None, max_length=200, description="a style adapter name (see GET /health); none: the base model",
    )
    blend: str | None = Field(None, max_length=200, description="a blend name (see GET /health); exclusive with style")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="random seed; same seed, same image")
    steps: int = Field(20, ge=1, le=200, description="denoising steps")
    guidance_scale: float = Field(4.0, ge=0.0, le=50.0, description="classifier-free guidance scale")
    negative_prompt: str | None = Field(
        None, max_length=MAX_NEGATIVE_CHARS, description="what to steer away from; none: the caller's default",
    )
    # Plain `dict[str, float]` (limits checked below): MLflow derives the pyfunc's input schema
    # from these annotations and accepts no constrained (Annotated) dictionary keys.
    styles: dict[str, float] | None = Field(
        None,
        min_length=1,
        max_length=MAX_BLEND_STYLES,
        description=f"request-time blend: style name -> weight in [-{MAX_STYLE_WEIGHT:g}, {MAX_STYLE_WEIGHT:g}] "
        f"(at most {MAX_BLEND_STYLES} of the model's styles); exclusive with style and blend",
    )
    sampler: str | None = Field(None, max_length=50, description="a sampler of the model's family; none: its own")
    batch: int = Field(1, ge=1, le=MAX_BATCH, description="images, seeded seed, seed+1, ...")

    @field_validator("styles")
    @classmethod
    def _style_weights(cls, styles: dict[str, float] | None) -> dict[str, float] | None:
        for name, weight in (styles or {}).items():
            if not 1 <= len(name) <= 200:
                raise ValueError(f"style names are 1 to 200 characters (got {len(name)})")
            if not -MAX_STYLE_WEIGHT <= weight <= MAX_STYLE_WEIGHT:  # NaN/inf are refused before this
                raise ValueError(
                    f"weight {weight} of style {name[:50]!r} is outside [-{MAX_STYLE_WEIGHT:g}, {MAX_STYLE_WEIGHT:g}]"
                )
        return styles


class UnknownAdapterError(ValueError):
    """A request named a style or blend the model does not have (HTTP 400)."""


class ModelLoadError(RuntimeError):
    """A registered model's artifacts are incomplete or its base model folder is missing."""


_REREGISTER = "register a good model again (`dvc repro register`) or point @champion at a good version"


def _read_manifest(path: Path) -> dict[str, Any]:
    import json

    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: the model manifest cannot be read ({exc}); {_REREGISTER}") from None
    if not isinstance(manifest, dict) or "family" not in manifest:
        raise ModelLoadError(f"{path}: the model manifest is not a JSON object naming the 'family'; {_REREGISTER}")
    return manifest


def _adapter_dirs(root: Path | None) -> dict[str, Path]:
    """`<root>/<name>/pytorch_lora_weights.safetensors` folders by name (sorted, stable)."""
    if root is None or not Path(root).is_dir():
        return {}
    return {p.parent.name: p.parent for p in sorted(Path(root).glob(f"*/{LORA_FILE}"))}


def _peft_name(kind: str, name: str) -> str:
    # PEFT keeps adapters in torch ModuleDicts, whose keys may not contain "."; the prefix
    # keeps a blend and a style of the same name apart.
    return f"{kind}_{re.sub(r'[^0-9A-Za-z_-]', '_', name)}"


def _own_memory(pipe: Any, peft_name: str) -> None:
    """Give the just-loaded adapter's weights their own memory.

    diffusers may leave LoRA weights on CPU as views of the safetensors file's memory map; a
    served model would then die with SIGBUS (not an exception) if that artifact were later
    truncated or rewritten in place. Adapters are small, so the copy is cheap.
    """
    import torch

    marker = f".{peft_name}."
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for pname, param in component.named_parameters():
                if marker in f".{pname}.":
                    param.data = param.data.clone()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class StyleModel:
    """A base pipeline with every style and blend LoRA attached; thread-safe generation."""

    def __init__(
        self,
        pipe: Any,
        family: Family,
        styles: dict[str, str],
        blends: dict[str, str],
        manifest: Mapping[str, Any],
        device: str,
    ) -> None:
        self.pipe = pipe
        self.family = family
        self.styles = styles  # style name -> PEFT adapter name
        self.blends = blends  # blend name -> PEFT adapter name
        self.manifest = dict(manifest)
        self.device = device
        # One diffusers pipeline is not safe to drive from two threads (adapter switching and
        # the scheduler's step state are shared), and FastAPI runs sync endpoints in a pool.
        self._lock = threading.Lock()
        self._preview_lock = threading.Lock()
        self._previewer: LatentPreviewer | None = None
        self.default_negative_prompt: str | None = None  # used when a request's negative_prompt is None
        self.last_switch_s: float | None = None  # how long the last adapter switch took

    @classmethod
    def load(cls, artifacts: Mapping[str, str | Path], device: str | None = None) -> StyleModel:
        """Load from a registered model's artifact paths (names as logged by the registry).

        `artifacts` maps `manifest`, `adapters`, `blends` and, when the base was small
        enough to bundle, `base` to local paths (MLflow's `context.artifacts`).
        """
        from stunning.checks import AdapterError, check_adapters
        from stunning.device import default_dtype, select_device
        from stunning.families import ModelNotFoundError, get_family

        if "manifest" not in artifacts:
            raise ModelLoadError(
                f"the model's artifacts lack {MANIFEST_NAME} (got {sorted(artifacts)}); "
                "it was not registered by `stages.register` — register it again with `dvc repro register`"
            )
        manifest = _read_manifest(Path(artifacts["manifest"]))
        base = Path(artifacts["base"]) if artifacts.get("base") else Path(manifest.get("base_path", ""))
        if not base.is_dir():
            raise ModelLoadError(
                f"the registered model's base model folder {base} does not exist (it was too large to "
                "bundle, so the model refers to it by path); restore it there or register the model again"
            )
        try:
            family = get_family(str(manifest.get("family")))
        except KeyError as exc:
            raise ModelLoadError(f"{artifacts['manifest']}: {exc.args[0]}; {_REREGISTER}") from None
        folders = {
            kind: _adapter_dirs(Path(root) if root else None)
            for kind, root in (("style", artifacts.get("adapters")), ("blend", artifacts.get("blends")))
        }
        # Every adapter file is checked (header, byte ranges, finite weights, LoRA layout)
        # before the pipeline is loaded, so a damaged artifact fails fast with its name.
        for table in folders.values():
            try:
                check_adapters(table.values(), family, fix=_REREGISTER)
            except AdapterError as exc:
                raise ModelLoadError(str(exc)) from None
        dev = select_device(device)
        try:
            pipe = family.load_pipeline(base, dev, default_dtype(dev))
        except ModelNotFoundError as exc:
            raise ModelLoadError(f"the registered model's base model cannot be loaded: {exc}") from None
        styles: dict[str, str] = {}
        blends: dict[str, str] = {}
        with warnings.catch_warnings():
            # PEFT warns on every adapter after the first; several named adapters is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            for kind, table in (("style", styles), ("blend", blends)):
                for name, folder in folders[kind].items():
                    peft_name = _peft_name(kind, name)
                    try:
                        pipe.load_lora_weights(str(folder), adapter_name=peft_name)
                    except (ValueError, KeyError, RuntimeError, OSError) as exc:
                        raise ModelLoadError(
                            f"{folder / LORA_FILE}: the {kind} adapter {name!r} does not fit the base model "
                            f"({type(exc).__name__}: {str(exc)[:300]}); {_REREGISTER}"
                        ) from None
                    _own_memory(pipe, peft_name)
                    table[name] = peft_name
        log.info(
            "loaded %s on %s: styles %s, blends %s",
            manifest.get("model_name", "model"),
            dev,
            sorted(styles),
            sorted(blends),
        )
        return cls(pipe, family, styles, blends, manifest, str(dev))

    @property
    def resolution(self) -> int:
        """The square image size in pixels this model generates."""
        return int(self.family.resolution(self.pipe))

    def _adapters_for(self, req: GenerateRequest) -> tuple[list[str], list[float]] | None:
        """(PEFT adapter names, weights) the request activates; None: the base model alone."""
        if req.style and req.blend:
            raise UnknownAdapterError("give either 'style' or 'blend', not both")
        if req.styles is not None and (req.style or req.blend):
            raise UnknownAdapterError("give either 'styles' (a request-time blend) or 'style'/'blend', not both")
        if req.style:
            if req.style not in self.styles:
                raise UnknownAdapterError(f"unknown style {req.style!r}; available styles: {sorted(self.styles)}")
            return [self.styles[req.style]], [1.0]
        if req.blend:
            if req.blend not in self.blends:
                raise UnknownAdapterError(f"unknown blend {req.blend!r}; available blends: {sorted(self.blends)}")
            return [self.blends[req.blend]], [1.0]
        if req.styles is not None:
            unknown = sorted(set(req.styles) - set(self.styles))
            if unknown:
                raise UnknownAdapterError(
                    f"'styles' names unknown style(s) {unknown}; available styles: {sorted(self.styles)}"
                )
            # The request's order is the summation order (PEFT adds active adapters in list order).
            return [self.styles[name] for name in req.styles], [float(w) for w in req.styles.values()]
        return None

    def _check_sampler(self, sampler: str | None) -> str | None:
        if sampler is None or sampler == "default":
            return None
        if sampler not in self.family.samplers:
            choice = sorted(self.family.samplers)
            raise UnknownAdapterError(
                f"unknown sampler {sampler!r}; the {self.family.name} family's samplers: {choice + ['default']}"
                if choice else f"unknown sampler {sampler!r}: the {self.family.name} family has no sampler choice "
                "(leave it out, or use 'default')"
            )
        return sampler

    def check(self, req: GenerateRequest) -> None:
        """Raise :class:`UnknownAdapterError` if the model cannot answer `req` (style, blend, sampler)."""
        self._adapters_for(req)
        self._check_sampler(req.sampler)

    def _activate(self, adapters: tuple[list[str], list[float]] | None) -> None:
        """Make exactly `adapters` active (call under the lock)."""
        if not (self.styles or self.blends):
            return
        t0 = time.perf_counter()
        if adapters is None:
            self.pipe.disable_lora()
        else:
            self.pipe.enable_lora()
            self.pipe.set_adapters(adapters[0], adapter_weights=adapters[1])
        self.last_switch_s = time.perf_counter() - t0

    def generate_images(self, req: GenerateRequest, on_step: StepCallback | None = None) -> list[Image.Image]:
        """`req.batch` images for `req` (seeds `seed, seed+1, ...`), with only its adapter(s) active.

        `on_step(step, total, latents)` is called after every sampling step (see
        :meth:`stunning.families.Family.generate`; it may raise to cancel). Raises
        :class:`UnknownAdapterError` for a style, blend or sampler the model does not have.
        """
        adapters = self._adapters_for(req)
        sampler = self._check_sampler(req.sampler)
        prompts = [req.prompt] * req.batch
        seeds = [req.seed + i for i in range(req.batch)]
        negative = req.negative_prompt if req.negative_prompt is not None else self.default_negative_prompt
        # Only non-default keywords are passed: an old-style request reaches the family exactly as before.
        kwargs: dict[str, Any] = {}
        if negative:
            kwargs["negative_prompts"] = [negative] * req.batch
        if on_step is not None:
            kwargs["on_step"] = on_step
        with self._lock:
            self._activate(adapters)
            scheduler = self.pipe.scheduler if sampler else None
            try:
                if sampler:
                    try:
                        self.family.set_sampler(self.pipe, sampler)
                    except ValueError as exc:
                        raise UnknownAdapterError(str(exc)) from None
                return self.family.generate(self.pipe, prompts, seeds, req.steps, req.guidance_scale, **kwargs)
            finally:
                if sampler:  # the next request samples with the model's own scheduler again
                    self.pipe.scheduler = scheduler

    def generate(self, req: GenerateRequest, on_step: StepCallback | None = None) -> Image.Image:
        """The first image of :meth:`generate_images` (one image for a default request)."""
        return self.generate_images(req, on_step=on_step)[0]

    def previewer(self) -> LatentPreviewer:
        """The model's latent-to-RGB previewer, fitted from its own VAE on first use (then cached).

        Fitting runs only the VAE, which adapters and samplers never change, so it does not
        take the generation lock (a preview may be asked for from inside `on_step`).
        """
        with self._preview_lock:
            if self._previewer is None:
                from stunning.studio.preview import fit_previewer

                self._previewer = fit_previewer(self.pipe, self.family)
            return self._previewer

    def preview(self, latents: Any) -> Image.Image:
        """A small RGB preview of in-loop latents `(batch, c, h, w)` (as `on_step` receives them);
        a batch is tiled left to right."""
        return self.previewer().image(latents)

    def generate_base64(self, req: GenerateRequest) -> str:
        return base64.b64encode(png_bytes(self.generate(req))).decode("ascii")
