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

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=2000, description="text prompt")
    style: str | None = Field(None, description="a style adapter name (see GET /health); none: the base model")
    blend: str | None = Field(None, description="a blend name (see GET /health); exclusive with style")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="random seed; same seed, same image")
    steps: int = Field(20, ge=1, le=200, description="denoising steps")
    guidance_scale: float = Field(4.0, ge=0.0, le=50.0, description="classifier-free guidance scale")


class UnknownAdapterError(ValueError):
    """A request named a style or blend the model does not have (HTTP 400)."""


class ModelLoadError(RuntimeError):
    """A registered model's artifacts are incomplete or its base model folder is missing."""


def _adapter_dirs(root: Path | None) -> dict[str, Path]:
    """`<root>/<name>/pytorch_lora_weights.safetensors` folders by name (sorted, stable)."""
    if root is None or not Path(root).is_dir():
        return {}
    return {p.parent.name: p.parent for p in sorted(Path(root).glob(f"*/{LORA_FILE}"))}


def _peft_name(kind: str, name: str) -> str:
    # PEFT keeps adapters in torch ModuleDicts, whose keys may not contain "."; the prefix
    # keeps a blend and a style of the same name apart.
    return f"{kind}_{re.sub(r'[^0-9A-Za-z_-]', '_', name)}"


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
        import json

        from stunning.device import default_dtype, select_device
        from stunning.families import get_family

        if "manifest" not in artifacts:
            raise ModelLoadError(
                f"the model's artifacts lack {MANIFEST_NAME} (got {sorted(artifacts)}); "
                "it was not registered by `stages.register` — register it again with `dvc repro register`"
            )
        manifest = json.loads(Path(artifacts["manifest"]).read_text())
        base = Path(artifacts["base"]) if artifacts.get("base") else Path(manifest.get("base_path", ""))
        if not base.is_dir():
            raise ModelLoadError(
                f"the registered model's base model folder {base} does not exist (it was too large to "
                "bundle, so the model refers to it by path); restore it there or register the model again"
            )
        family = get_family(manifest["family"])
        dev = select_device(device)
        pipe = family.load_pipeline(base, dev, default_dtype(dev))
        styles: dict[str, str] = {}
        blends: dict[str, str] = {}
        with warnings.catch_warnings():
            # PEFT warns on every adapter after the first; several named adapters is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            for kind, root, table in (
                ("style", artifacts.get("adapters"), styles),
                ("blend", artifacts.get("blends"), blends),
            ):
                for name, folder in _adapter_dirs(Path(root) if root else None).items():
                    peft_name = _peft_name(kind, name)
                    pipe.load_lora_weights(str(folder), adapter_name=peft_name)
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
