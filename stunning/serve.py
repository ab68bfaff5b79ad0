"""Serving: the registered style model as a small FastAPI server.

:func:`create_app` resolves `models:/<name>@champion` (or another alias/version) at start-up,
loads it as a :class:`stunning.style_model.StyleModel` (the same loading and generation path
as the MLflow pyfunc model `stunning.registry.StunningStyleModel`, so `mlflow models serve`
and `stunning serve` return the same pixels for the same request) and serves `GET /health`
and `POST /generate`; with no champion yet, or a champion whose artifacts cannot be loaded
(a damaged adapter, a missing base folder), it still starts: `/generate` answers 503 with the
reason and `/health` says `{"status": "degraded", "model": ..., "error": ...}`. A reload
(`app.state.reload()`) swaps models under a lock and keeps serving the last good model when
the new one fails to load.

Requests are checked before any generation: bodies over `max_body_bytes` (64 KiB by default)
get 413 without being read further, non-finite numbers (NaN, ±Infinity) and every other schema
error get 422 with a small JSON body that never echoes large inputs back.
:func:`run_server` binds to loopback by default: the server has no authentication.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import math
import re
import threading
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


DEFAULT_MAX_BODY_BYTES = 64 * 1024  # a request is a prompt of <= 2000 characters and a few numbers
MAX_ECHO_CHARS = 200  # how much of an offending input a 422 body repeats
MAX_ERRORS = 20  # validation errors listed per 422 body


@dataclass
class _ServerState:
    model_uri: str
    model: StyleModel | None = None
    version: int | None = None
    error: str | None = None  # why no model is served, or why the last reload failed
    info: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards swapping model/version/info

    @property
    def unavailable(self) -> str | None:  # the reason /generate answers 503 (None: a model is served)
        return self.error if self.model is None else None


class _Unavailable(Exception):
    """The model to serve cannot be resolved or loaded; the message says why and what to do."""


def _brief(value: Any, limit: int = MAX_ECHO_CHARS) -> Any:
    """`value` made JSON-safe and small: non-finite floats as strings, long text cut to `limit`."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, int):
        if value.bit_length() > 10_000:  # str() of such an int is refused (and long)
            return f"<integer of {value.bit_length()} bits>"
        text = str(value)
        return value if len(text) <= limit else f"{text[:limit]}... ({len(text)} digits)"
    if isinstance(value, str):
        return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} characters)"
    try:
        text = json.dumps(value, default=str, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return _brief(text, limit) if len(text) > limit else _brief_json(value, limit)


def _brief_json(value: Any, limit: int) -> Any:
    if isinstance(value, dict):
        return {str(_brief(k, limit)): _brief(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_brief(v, limit) for v in value]
    return _brief(str(value), limit)


def validation_error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The 422 body for pydantic/FastAPI `errors`: each error's type, location, message and a
    short, JSON-safe `input` (never the whole request); at most `MAX_ERRORS` of them."""
    out = []
    for err in errors[:MAX_ERRORS]:
        item: dict[str, Any] = {
            "type": _brief(err.get("type")),
            "loc": [_brief(x, 100) for x in err.get("loc", ())],
            "msg": _brief(str(err.get("msg", "")), 300),
        }
        if "input" in err:
            item["input"] = _brief(err["input"])
        ctx = err.get("ctx")
        if isinstance(ctx, dict):
            item["ctx"] = {str(k): _brief(v if isinstance(v, int | float | str | bool) else str(v)) for k, v in ctx.items()}
        out.append(item)
    body: dict[str, Any] = {"detail": out}
    if len(errors) > MAX_ERRORS:
        body["omitted_errors"] = len(errors) - MAX_ERRORS
    return body


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 without being read further.

    A declared `Content-Length` over the limit is refused before reading anything; a body
    without one (chunked) is read only up to the limit, then refused or replayed to the app.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await self._reply(send, 400, "invalid Content-Length header")
                return
            if declared > self.max_bytes:
                await self._too_large(send)
                return
        # Read (at most the limit of) the body here, then hand the app exactly what was read.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Any) -> None:
        await self._reply(send, 413, f"request body larger than {self.max_bytes} bytes")

    @staticmethod
    async def _reply(send: Any, status: int, detail: str) -> None:
        data = json.dumps({"detail": detail}).encode()
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                        (b"connection", b"close")],
        })
        await send({"type": "http.response.body", "body": data})


def create_app(
    model_uri: str | None,
    cfg: RegistryConfig,
    root: str | Path | None = None,
    device: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app serving `model_uri` (default `models:/<cfg.model_name>@champion`).

    The model is resolved and loaded once at start-up (the app's lifespan; with
    `TestClient` use it as a context manager). Without a champion, or with one that cannot be
    loaded, the app still starts: `/generate` answers 503 naming the reason and what to run,
    `/health` reports `degraded`. `app.state.reload()` resolves and loads again, swapping the
    served model only when the new one loaded. Request bodies over `max_body_bytes` get 413.
    """
    from fastapi import FastAPI, Header, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    name, alias, version = parse_model_uri(model_uri, cfg.model_name)
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    state = _ServerState(model_uri=uri)

    def resolve_and_load() -> tuple[int | None, StyleModel]:
        """Resolve `uri` and load it; raises :class:`_Unavailable` with the reason."""
        try:
            from stunning.mlflow_store import TrackingStoreError
            from stunning.registry import NoChampionError, model_artifacts, resolve
        except Exception as exc:  # the registry (MLflow) itself is broken or absent
            raise _Unavailable(f"the model registry cannot be used ({type(exc).__name__}: {exc})") from None
        try:
            found, model_dir = resolve(cfg, alias=alias, root=root, model_name=name, version=version)
        except NoChampionError as exc:
            raise _Unavailable(
                f"{exc} Run `dvc repro` first: the register stage promotes a candidate that passes the gate."
            ) from None
        except TrackingStoreError as exc:  # corrupt or locked mlflow.db: the message says how to recover
            log.error("%s", exc)
            raise _Unavailable(str(exc)) from None
        except Exception as exc:
            log.exception("resolving %s failed", uri)
            raise _Unavailable(f"{uri} cannot be resolved in the registry ({type(exc).__name__}: {exc})") from None
        try:
            return found, StyleModel.load(model_artifacts(model_dir), device=device)
        except ModelLoadError as exc:
            raise _Unavailable(f"{uri} (v{found}) cannot be loaded: {exc}") from None
        except Exception as exc:  # anything else in a broken artifact: serve degraded, never crash
            log.exception("loading %s (v%s) failed", uri, found)
            raise _Unavailable(f"{uri} (v{found}) cannot be loaded: {type(exc).__name__}: {exc}") from None

    def reload() -> bool:
        """Resolve and load the model again; swap it in only when it loaded. True: swapped.

        On failure the last good model (if any) keeps serving and `/health` says `degraded`
        with the reason."""
        try:
            found, model = resolve_and_load()
        except _Unavailable as exc:
            with state.lock:
                if state.model is None:
                    state.error = str(exc)
                    log.error("serving nothing: %s", state.error)
                else:
                    state.error = f"reload failed, still serving v{state.version}: {exc}"
                    log.error("%s", state.error)
            return False
        info = {
            "model_name": name,
            "version": found,
            "alias": alias,
            "model_uri": uri,
            "styles": sorted(model.styles),
            "blends": sorted(model.blends),
            "device": model.device,
            "resolution": model.resolution,
            "family": model.manifest.get("family"),
        }
        with state.lock:
            state.model, state.version, state.info, state.error = model, found, info, None
        log.info("serving %s (v%s)", uri, found)
        return True

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        reload()
        yield
        with state.lock:
            state.model = None

    app = FastAPI(
        title="Stunning Engine",
        summary="Generate images with the registry's champion LoRA style model.",
        lifespan=lifespan,
    )
    app.state.reload = reload
    app.state.server = state
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content=validation_error_body(list(exc.errors())))

    def unavailable(reason: str | None) -> JSONResponse:
        return JSONResponse(
            status_code=503,
            content={"status": "degraded", "model": uri, "error": reason, "detail": reason},
        )

    @app.get("/health")
    def health():
        """`ok` with the served model (name, version, alias), its styles and blends and the device;
        `degraded` (503 when nothing is served) with the `error` that keeps it from serving."""
        with state.lock:
            model, error, info = state.model, state.error, dict(state.info)
        if model is None:
            return unavailable(error)
        return {"status": "degraded" if error else "ok", "model": uri, "error": error, **info}

    @app.post(
        "/generate",
        responses={200: {"content": {"image/png": {}, "application/json": {}}}, 400: {}, 503: {}},
    )
    def generate(req: GenerateRequest, accept: str = Header("image/png")):
        """A PNG image (or JSON with base64 PNG when the client accepts only JSON)."""
        with state.lock:
            model, served_version, error = state.model, state.version, state.error
        if model is None:
            return unavailable(error)
        t0 = time.perf_counter()
        try:
            image = model.generate(req)
        except UnknownAdapterError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        elapsed = time.perf_counter() - t0
        data = png_bytes(image)
        headers = {"X-Model-Version": str(served_version), "X-Seed": str(req.seed), "X-Elapsed-S": f"{elapsed:.3f}"}
        if "application/json" in accept and "image/png" not in accept:
            return JSONResponse(
                content={
                    "image_base64": base64.b64encode(data).decode("ascii"),
                    "media_type": "image/png",
                    "width": image.width,
                    "height": image.height,
                    "model_name": name,
                    "version": served_version,
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
