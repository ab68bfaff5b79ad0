"""A registered style model as a Python object: :class:`StyleModel`, and the request it answers.

:class:`StyleModel` is the one loading and generation path for a registered model: it loads
the base pipeline (bundled in the model's artifacts, or the external folder its manifest
names) with every style adapter and blend attached as named LoRA adapters, and generates one
image per request (:class:`GenerateRequest`) with the chosen adapter active. The MLflow pyfunc
wrapper (`stunning.registry.StunningStyleModel`) and the HTTP server (`stunning.serve`) both
use it, so `mlflow models serve` and `stunning serve` return the same pixels for the same
request. Both import this module; it imports neither (nor MLflow).
"""

from __future__ import annotations

import base64
import io
import logging
import re
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from stunning.families.base import LORA_FILE

if TYPE_CHECKING:
    from PIL import Image

    from stunning.families import Family

log = logging.getLogger(__name__)

__all__ = [
    "LORA_FILE", "MANIFEST_NAME", "GenerateRequest", "ModelLoadError", "StyleModel", "UnknownAdapterError", "png_bytes",
]

MANIFEST_NAME = "stunning_model.json"  # the registered model's manifest artifact


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

    def _adapter_for(self, req: GenerateRequest) -> str | None:
        if req.style and req.blend:
            raise UnknownAdapterError("give either 'style' or 'blend', not both")
        if req.style:
            if req.style not in self.styles:
                raise UnknownAdapterError(f"unknown style {req.style!r}; available styles: {sorted(self.styles)}")
            return self.styles[req.style]
        if req.blend:
            if req.blend not in self.blends:
                raise UnknownAdapterError(f"unknown blend {req.blend!r}; available blends: {sorted(self.blends)}")
            return self.blends[req.blend]
        return None

    def generate(self, req: GenerateRequest) -> Image.Image:
        """One image for `req`, with only its style/blend adapter active (none: the base)."""
        adapter = self._adapter_for(req)
        with self._lock:
            if self.styles or self.blends:
                if adapter is None:
                    self.pipe.disable_lora()
                else:
                    self.pipe.enable_lora()
                    self.pipe.set_adapters([adapter], adapter_weights=[1.0])
            return self.family.generate(self.pipe, [req.prompt], [req.seed], req.steps, req.guidance_scale)[0]

    def generate_base64(self, req: GenerateRequest) -> str:
        return base64.b64encode(png_bytes(self.generate(req))).decode("ascii")
