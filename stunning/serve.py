"""Serving: the registered style model as a Python object and as a small FastAPI server.

:class:`StyleModel` is the one loading and generation path for a registered model: it loads
the base pipeline (bundled in the model's artifacts, or the external folder its manifest
names) with every style adapter and blend attached as named LoRA adapters, and generates one
image per request with the chosen adapter active. The MLflow pyfunc wrapper
(`stunning.registry.StunningStyleModel`) and the HTTP server both use it, so `mlflow
models serve` and `stunning serve` return the same pixels for the same request.

:func:`create_app` resolves `models:/<name>@champion` (or another alias/version) at start-up
and serves `GET /health` and `POST /generate`; with no champion yet it still starts and
answers 503 with what to run. :func:`run_server` binds to loopback by default: the server
has no authentication.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import logging
import re
import threading
import time
import warnings
from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from fastapi import FastAPI
    from PIL import Image

    from stunning.config import RegistryConfig

log = logging.getLogger(__name__)

MANIFEST_NAME = "stunning_model.json"
LORA_FILE = "pytorch_lora_weights.safetensors"


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
        family: Any,
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
    def resolution(self) -> int | None:
        fn = getattr(self.family, "resolution", None)
        return int(fn(self.pipe)) if fn else None

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


# --------------------------------------------------------------------------- HTTP server


def parse_model_uri(model_uri: str | None, default_name: str) -> tuple[str, str | None, int | None]:
    """`models:/<name>@<alias>` or `models:/<name>/<version>` → (name, alias, version)."""
    if not model_uri:
        return default_name, "champion", None
    m = re.fullmatch(r"models:/([^/@]+)@([\w.-]+)", model_uri)
    if m:
        return m.group(1), m.group(2), None
    m = re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri)
    if m:
        return m.group(1), None, int(m.group(2))
    raise ValueError(f"model URI {model_uri!r} not understood: use models:/<name>@<alias> or models:/<name>/<version>")


@dataclass
class _ServerState:
    model_uri: str
    model: StyleModel | None = None
    version: int | None = None
    unavailable: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def create_app(
    model_uri: str | None,
    cfg: RegistryConfig,
    root: str | Path | None = None,
    device: str | None = None,
) -> FastAPI:
    """The FastAPI app serving `model_uri` (default `models:/<cfg.model_name>@champion`).

    The model is resolved and loaded once at start-up (the app's lifespan; with
    `TestClient` use it as a context manager). Without a champion the app still starts and
    every endpoint answers 503 naming what to run.
    """
    from fastapi import FastAPI, Header, HTTPException
    from fastapi.responses import JSONResponse, Response

    from stunning.registry import NoChampionError, model_artifacts, resolve

    name, alias, version = parse_model_uri(model_uri, cfg.model_name)
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    state = _ServerState(model_uri=uri)

    def load() -> None:
        try:
            state.version, model_dir = resolve(cfg, alias=alias, root=root, model_name=name, version=version)
        except NoChampionError as exc:
            state.unavailable = (
                f"{exc} Run `dvc repro` first: the register stage promotes a candidate that passes the gate."
            )
            log.warning("serving nothing yet: %s", state.unavailable)
            return
        try:
            state.model = StyleModel.load(model_artifacts(model_dir), device=device)
        except ModelLoadError as exc:
            state.unavailable = f"{uri} (v{state.version}) cannot be loaded: {exc}"
            log.error("%s", state.unavailable)
            return
        state.info = {
            "model_name": name,
            "version": state.version,
            "alias": alias,
            "model_uri": uri,
            "styles": sorted(state.model.styles),
            "blends": sorted(state.model.blends),
            "device": state.model.device,
            "resolution": state.model.resolution,
            "family": state.model.manifest.get("family"),
        }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        load()
        yield
        state.model = None

    app = FastAPI(
        title="Stunning Engine",
        summary="Generate images with the registry's champion LoRA style model.",
        lifespan=lifespan,
    )

    def unavailable() -> JSONResponse:
        return JSONResponse(status_code=503, content={"status": "unavailable", "detail": state.unavailable})

    @app.get("/health")
    def health():
        """Which model is served (name, version, alias), its styles and blends, the device."""
        if state.model is None:
            return unavailable()
        return {"status": "ok", **state.info}

    @app.post(
        "/generate",
        responses={200: {"content": {"image/png": {}, "application/json": {}}}, 400: {}, 503: {}},
    )
    def generate(req: GenerateRequest, accept: str = Header("image/png")):
        """A PNG image (or JSON with base64 PNG when the client accepts only JSON)."""
        if state.model is None:
            return unavailable()
        t0 = time.perf_counter()
        try:
            image = state.model.generate(req)
        except UnknownAdapterError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        elapsed = time.perf_counter() - t0
        data = png_bytes(image)
        headers = {"X-Model-Version": str(state.version), "X-Seed": str(req.seed), "X-Elapsed-S": f"{elapsed:.3f}"}
        if "application/json" in accept and "image/png" not in accept:
            return JSONResponse(
                content={
                    "image_base64": base64.b64encode(data).decode("ascii"),
                    "media_type": "image/png",
                    "width": image.width,
                    "height": image.height,
                    "model_name": name,
                    "version": state.version,
                    "style": req.style,
                    "blend": req.blend,
                    "seed": req.seed,
                    "steps": req.steps,
                    "guidance_scale": req.guidance_scale,
                    "elapsed_s": round(elapsed, 4),
                },
                headers=headers,
            )
        return Response(content=data, media_type="image/png", headers=headers)

    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_uri: str | None = None,
    cfg: RegistryConfig | None = None,
    root: str | Path | None = None,
    device: str | None = None,
) -> None:
    """Serve with uvicorn until interrupted. Loopback only unless `host` says otherwise."""
    import uvicorn

    from stunning.config import RegistryConfig

    if not _is_loopback(host):
        log.warning("serving on %s: the server has no authentication; anyone who can reach it can use it", host)
    app = create_app(model_uri, cfg or RegistryConfig(), root=root, device=device)
    uvicorn.run(app, host=host, port=port, log_level="info")


def serve_command(
    host: str = "127.0.0.1",
    port: int = 8000,
    params_path: str | Path = "params.yaml",
    alias: str = "champion",
    device: str | None = None,
) -> None:
    """`stunning serve`: serve `<registry.model_name>@<alias>` of the project at `params_path`.

    The MLflow store's relative paths are resolved against the folder of `params_path` (the
    project root), so the command works from anywhere. Raises `ConfigError` on bad params.
    """
    from stunning.config import load_params

    params_path = Path(params_path)
    params = load_params(params_path)
    cfg = params.registry
    run_server(
        host,
        port,
        model_uri=f"models:/{cfg.model_name}@{alias}",
        cfg=cfg,
        root=params_path.resolve().parent,
        device=device,
    )
