"""Serving: the registered style model as a small FastAPI server.

:func:`create_app` resolves `models:/<name>@champion` (or another alias/version) at start-up,
loads it as a :class:`stunning.style_model.StyleModel` (the same loading and generation path
as the MLflow pyfunc model `stunning.registry.StunningStyleModel`, so `mlflow models serve`
and `stunning serve` return the same pixels for the same request) and serves `GET /health`
and `POST /generate`; with no champion yet it still starts and answers 503 with what to run.
:func:`run_server` binds to loopback by default: the server has no authentication.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stunning.style_model import GenerateRequest, ModelLoadError, StyleModel, UnknownAdapterError, png_bytes

if TYPE_CHECKING:
    from fastapi import FastAPI

    from stunning.config import RegistryConfig

log = logging.getLogger(__name__)

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
