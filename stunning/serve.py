"""Serving: the registered style model as a small, hardened FastAPI server (the studio API).

:func:`create_app` resolves `models:/<name>@champion` (or another alias/version) at start-up,
loads it as a :class:`stunning.style_model.StyleModel` (the same loading and generation path
as the MLflow pyfunc model `stunning.registry.StunningStyleModel`, so `mlflow models serve`
and `stunning serve` return the same pixels for the same request) and serves:

- `POST /generate`: a PNG (or JSON with base64 PNGs when the client accepts only JSON, and
  always for `batch` > 1); `POST /generate/stream`: server-sent events — `queued`, `preview`
  (step, total, a small base64 PNG of the in-loop latents), one `image` per image (base64
  PNG, model version, seed, parameters), or `error` / `cancelled`. Both take an optional
  `channel` (query parameter or `X-Channel` header): a new request on a channel cancels that
  channel's previous pending or running request, so a moved slider restarts its preview.
- `GET /health` (the served model), `GET /ready` (200 only with a model loaded and room in
  the queue), `GET /metrics` (Prometheus text: requests by endpoint and status, latency,
  queue depth, images drawn, the served version), `/docs` and `/openapi.json`. These stay
  open: probes and scrapers carry no keys, and none of them draws or reveals a key.

Generation is guarded in this order: API key (`Authorization: Bearer <key>` from
`stunning keys create`; missing or invalid → 401 with `WWW-Authenticate: Bearer`), per-key
rate limit (token bucket; 429 with `Retry-After`), request validation (bodies over
`max_body_bytes` → 413 unread; schema errors → 422 naming each field, never echoing large
inputs), then a bounded job queue with one worker (:mod:`stunning.studio.jobs`; full → 503 with
`Retry-After`). `ServeSettings(auth=False)` (`stunning serve --no-auth`) is for local use
and :func:`run_server` refuses it on a non-loopback interface.

With no champion yet, or a champion whose artifacts cannot be loaded, the app still starts:
`/generate` answers 503 with the reason and `/health` says `degraded`. The served model is
switched without a restart: a background thread polls the alias every `poll_seconds` and,
when it moved (a promotion or a rollback), loads the new version fully and swaps it in under
a lock; a request keeps the model it was accepted with, so in-flight requests finish on it,
and every response names the version that drew it (`X-Model-Version`, and `version` in JSON
bodies). A failed load keeps the last good model serving. :func:`run_server` binds to
loopback by default.
"""

from __future__ import annotations

import asyncio
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
from typing import TYPE_CHECKING, Annotated, Any

# FastAPI reads endpoint and dependency annotations from this module's globals (they are
# strings here), so the two types it injects by annotation are imported at module level.
from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import Request

from stunning.style_model import GenerateRequest, ModelLoadError, StyleModel, UnknownAdapterError, png_bytes

if TYPE_CHECKING:
    from fastapi import FastAPI

    from stunning.config import RegistryConfig
    from stunning.studio.jobs import JobEvent, JobRunner

log = logging.getLogger(__name__)

_BEARER = HTTPBearer(auto_error=False, description="an API key from `stunning keys create`")


@dataclass(frozen=True)
class ServeSettings:
    """How the server guards generation (defaults: auth on, modest limits for one machine)."""

    auth: bool = True  # False: no API keys (local use only; refused off loopback by run_server)
    keys_path: Path | None = None  # default <root>/studio/keys.json
    rate_per_minute: float = 60.0  # per API key (per client address without auth); 0: no limit
    burst: int = 10  # requests a key may make at once before the rate applies
    max_pending: int = 16  # jobs waiting behind the one being drawn; more -> 503
    poll_seconds: float = 5.0  # how often the alias is checked for a new version; 0: never
    request_timeout_s: float = 600.0  # a /generate waiting longer is cancelled (504)

    def __post_init__(self) -> None:
        if self.max_pending < 1:
            raise ValueError(f"max_pending={self.max_pending}: at least one request must be able to wait")
        if self.rate_per_minute > 0 and self.burst < 1:
            raise ValueError(f"burst={self.burst}: must be at least 1 when rate_per_minute > 0")
        if self.poll_seconds < 0:
            raise ValueError(f"poll_seconds={self.poll_seconds}: must be 0 (off) or more")


class UnsafeBindError(ValueError):
    """`--no-auth` on an interface other hosts can reach."""


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
    failed_version: int | None = None  # the version whose load failed last (not retried by the poll)
    info: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards swapping model/version/info
    reload_lock: threading.Lock = field(default_factory=threading.Lock)  # one load at a time
    jobs: JobRunner | None = None

    @property
    def unavailable(self) -> str | None:  # the reason /generate answers 503 (None: a model is served)
        return self.error if self.model is None else None


class _Unavailable(Exception):
    """The model to serve cannot be resolved or loaded; the message says why and what to do."""

    def __init__(self, message: str, version: int | None = None) -> None:
        super().__init__(message)
        self.version = version


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
    """The 422 body for pydantic/FastAPI `errors`: a one-line `message` naming the first fields
    at fault (``"invalid request: steps: Input should be less than or equal to 200"``), then
    each error's type, location, message and a short, JSON-safe `input` (never the whole
    request); at most `MAX_ERRORS` of them."""
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
    fields = []
    for item in out[:3]:
        loc = list(item["loc"])
        where = ".".join(str(x) for x in (loc[1:] if loc[:1] == ["body"] else loc)) or "body"
        fields.append(f"{where}: {item['msg']}")
    body: dict[str, Any] = {"message": _brief("invalid request: " + "; ".join(fields), 600), "detail": out}
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


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _Metrics:
    """The app's Prometheus metrics, in a registry of its own (tests build many apps)."""

    def __init__(self, state: _ServerState) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("stunning_http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("stunning_http_request_duration_seconds", "HTTP request latency (to the last byte)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("stunning_images_generated", "images generated", registry=r)
        self.switches = Counter("stunning_model_switches", "served model swapped in without a restart", registry=r)
        self.version = Gauge("stunning_model_version", "registry version being served (0: none)",
                             ["model_name", "alias"], registry=r)
        queue = Gauge("stunning_queue_depth", "jobs waiting behind the one being drawn", registry=r)
        queue.set_function(lambda: float(state.jobs.pending) if state.jobs is not None else 0.0)
        running = Gauge("stunning_jobs_running", "jobs being drawn (0 or 1)", registry=r)
        running.set_function(lambda: 1.0 if state.jobs is not None and state.jobs.running is not None else 0.0)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Observe:
    """ASGI middleware: counts and times every HTTP request by route and status, and adds
    `X-Model-Version` (the version served now) to responses that do not name one already."""

    def __init__(self, app: Any, metrics: _Metrics, state: _ServerState, static_paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.state = state
        self.static_paths = static_paths  # routes without an APIRoute (OpenAPI, docs)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        recorded = False

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or scope.get("path", "")
            if route is None and endpoint not in self.static_paths:
                endpoint = "unmatched"  # never an arbitrary raw path: label values stay bounded
            self.metrics.requests.labels(endpoint, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

        async def observed_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers") or [])
                version = self.state.version
                if version is not None and not any(k.lower() == b"x-model-version" for k, _ in headers):
                    headers.append((b"x-model-version", str(version).encode()))
                    message = {**message, "headers": headers}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        try:
            await self.app(scope, receive, observed_send)
        finally:
            record()


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _b64png(image: Any) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def create_app(
    model_uri: str | None,
    cfg: RegistryConfig,
    root: str | Path | None = None,
    device: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    *,
    settings: ServeSettings | None = None,
) -> FastAPI:
    """The FastAPI app serving `model_uri` (default `models:/<cfg.model_name>@champion`).

    The model is resolved and loaded at start-up (the app's lifespan; with `TestClient` use
    it as a context manager), which also starts the job worker and, for an alias with
    `settings.poll_seconds` > 0, the thread that follows the alias. Without a champion, or
    with one that cannot be loaded, the app still starts: `/generate` answers 503 naming the
    reason and what to run, `/health` reports `degraded`. `app.state.reload()` resolves and
    loads again, swapping the served model only when the new one loaded; `app.state.poll()`
    does so only when the alias points at a version other than the one served (True: swapped).
    Request bodies over `max_body_bytes` get 413. `settings` (default :class:`ServeSettings`,
    auth on) sets keys, limits and polling; `app.state.keys` is the key store.
    """
    from fastapi import FastAPI, Header, HTTPException, Query
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    from stunning.studio.jobs import JobRunner, QueueFull
    from stunning.studio.keys import KeyStore, KeyStoreError, default_keys_path
    from stunning.studio.negatives import NegativesInputError, default_negative
    from stunning.studio.preview import until_it_fails
    from stunning.studio.ratelimit import RateLimiter

    settings = settings or ServeSettings()
    name, alias, version = parse_model_uri(model_uri, cfg.model_name)
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    named_cfg = cfg.model_copy(update={"model_name": name})
    state = _ServerState(model_uri=uri)
    metrics = _Metrics(state)
    keys = KeyStore(settings.keys_path or default_keys_path(root))
    limiter = RateLimiter(settings.rate_per_minute, settings.burst)

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
            model = StyleModel.load(model_artifacts(model_dir), device=device)
        except ModelLoadError as exc:
            raise _Unavailable(f"{uri} (v{found}) cannot be loaded: {exc}", found) from None
        except Exception as exc:  # anything else in a broken artifact: serve degraded, never crash
            log.exception("loading %s (v%s) failed", uri, found)
            raise _Unavailable(f"{uri} (v{found}) cannot be loaded: {type(exc).__name__}: {exc}", found) from None
        try:  # fit the latent previewer now, so the first streamed request does not wait for it
            model.previewer()
        except Exception:
            log.warning("%s (v%s): no latent previews (the previewer could not be fitted)", uri, found, exc_info=True)
        return found, model

    def reload() -> bool:
        """Resolve and load the model again; swap it in only when it loaded. True: swapped.

        On failure the last good model (if any) keeps serving and `/health` says `degraded`
        with the reason. Requests already accepted keep the model they were accepted with."""
        with state.reload_lock:
            try:
                found, model = resolve_and_load()
            except _Unavailable as exc:
                with state.lock:
                    state.failed_version = exc.version
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
                previous = state.version if state.model is not None else None
                state.model, state.version, state.info, state.error = model, found, info, None
                state.failed_version = None
            metrics.version.labels(name, alias or "").set(float(found or 0))
            if previous is not None:
                metrics.switches.inc()
                log.info("switched %s from v%s to v%s", uri, previous, found)
            else:
                log.info("serving %s (v%s)", uri, found)
            return True

    def poll() -> bool:
        """Swap in the alias's version when it moved (promotion or rollback). True: swapped."""
        if alias is None:
            return False
        try:
            from stunning.registry import aliases

            current = aliases(named_cfg, root).get(alias)
        except Exception as exc:  # a locked or missing store: keep serving, try again next time
            log.warning("checking %s failed: %s", uri, exc)
            return False
        with state.lock:
            served, failed, have = state.version, state.failed_version, state.model is not None
        if current is None or (have and current == served) or current == failed:
            return False
        log.info("%s now points at v%s (serving v%s): loading it", uri, current, served)
        return reload()

    def follow_alias(stop: threading.Event) -> None:
        while not stop.wait(settings.poll_seconds):
            try:
                poll()
            except Exception:  # the poller must outlive any one failure
                log.exception("polling %s failed", uri)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.jobs = JobRunner(max_pending=settings.max_pending)
        await asyncio.to_thread(reload)
        stop = threading.Event()
        poller = None
        if alias is not None and settings.poll_seconds > 0:
            poller = threading.Thread(target=follow_alias, args=(stop,), name="stunning-alias-poll", daemon=True)
            poller.start()
        try:
            yield
        finally:
            stop.set()
            state.jobs.close()
            if poller is not None:
                poller.join(timeout=30)
            keys.flush()
            with state.lock:
                state.model = None

    app = FastAPI(
        title="Stunning Engine",
        summary="Generate images with the registry's champion LoRA style model.",
        lifespan=lifespan,
    )
    app.state.reload = reload
    app.state.poll = poll
    app.state.server = state
    app.state.keys = keys
    app.state.metrics = metrics
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    static = frozenset(p for p in (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url) if p)
    app.add_middleware(_Observe, metrics=metrics, state=state, static_paths=static)  # outermost: sees 413s too

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content=validation_error_body(list(exc.errors())))

    def unavailable(reason: str | None) -> JSONResponse:
        return JSONResponse(
            status_code=503,
            content={"status": "degraded", "model": uri, "error": reason, "detail": reason},
        )

    def client_of(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> str:
        """Who is asking (an API key's id, or the client address without auth), after the key
        check (401) and the rate limit (429)."""
        if settings.auth:
            try:
                record = keys.verify(credentials.credentials if credentials else None)
            except KeyStoreError as exc:
                log.error("%s", exc)
                raise HTTPException(503, detail="the server's API key file cannot be read") from None
            if record is None:
                challenge = 'Bearer realm="stunning"' + (', error="invalid_token"' if credentials else "")
                raise HTTPException(
                    401,
                    detail="an API key is required: send `Authorization: Bearer <key>` (create one with "
                    "`stunning keys create`)" if credentials is None else "invalid or revoked API key",
                    headers={"WWW-Authenticate": challenge},
                )
            client = f"key:{record.id}"
        else:
            client = f"addr:{request.client.host if request.client else 'unknown'}"
        wait = limiter.acquire(client)
        if wait:
            raise HTTPException(
                429,
                detail=f"rate limit of {settings.rate_per_minute:g} requests/minute (burst {settings.burst}) "
                f"reached; retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        return client

    def channel_of(client: str, query: str | None, header: str | None) -> str | None:
        channel = query or header
        return f"{client}/{channel}" if channel else None  # channels are per key: nobody cancels another's

    def served() -> tuple[StyleModel | None, int | None, str | None]:
        with state.lock:
            return state.model, state.version, state.error

    def queue_full(exc: QueueFull) -> JSONResponse:
        return JSONResponse(
            status_code=503,
            content={"detail": str(exc), "pending": exc.pending, "retry_after": exc.retry_after},
            headers={"Retry-After": str(exc.retry_after)},
        )

    def with_default_negative(req: GenerateRequest) -> GenerateRequest:
        """`req` with the style's saved default negative prompt (`stunning negatives optimize`,
        `<root>/studio/negatives.yaml`) when it gives none; an explicit one ("" included) wins."""
        if req.negative_prompt is not None or root is None:
            return req
        try:
            saved = default_negative(root, style=req.style, blend=req.blend, weights=req.styles)
        except NegativesInputError as exc:  # a damaged store: draw without, say why in the log
            log.warning("%s", exc)
            return req
        return req if saved is None else req.model_copy(update={"negative_prompt": saved})

    def error_reply(exc: BaseException) -> tuple[int, str]:
        if isinstance(exc, UnknownAdapterError):
            return 400, str(exc)
        log.error("generation failed", exc_info=exc)
        return 500, f"generation failed ({type(exc).__name__}: {str(exc)[:300]})"

    channel_query = Query(None, max_length=100, description="a new request on a channel cancels its previous one")
    channel_header = Header(None, alias="X-Channel", max_length=100, description="same as the `channel` query parameter")

    @app.get("/health")
    def health():
        """`ok` with the served model (name, version, alias), its styles and blends and the device;
        `degraded` (503 when nothing is served) with the `error` that keeps it from serving."""
        with state.lock:
            model, error, info = state.model, state.error, dict(state.info)
        if model is None:
            return unavailable(error)
        return {"status": "degraded" if error else "ok", "model": uri, "error": error, **info}

    @app.get("/ready", responses={503: {}})
    def ready():
        """200 when a model is served and the queue has room; 503 (with the reason) otherwise."""
        model, served_version, error = served()
        jobs = state.jobs
        queue = {"pending": jobs.pending if jobs else 0, "max_pending": settings.max_pending,
                 "running": bool(jobs and jobs.running)}
        if model is None:
            return JSONResponse(status_code=503, content={"ready": False, "reason": error, "queue": queue})
        if jobs is None or jobs.full:
            retry = jobs.retry_after() if jobs else 1
            return JSONResponse(status_code=503, headers={"Retry-After": str(retry)},
                                content={"ready": False, "reason": "the job queue is full", "queue": queue})
        return {"ready": True, "version": served_version, "queue": queue}

    @app.get("/metrics", response_class=Response)
    def prometheus_metrics():
        """Prometheus text exposition of this server's metrics."""
        data, content_type = metrics.exposition()
        return Response(content=data, media_type=content_type)

    @app.post(
        "/generate",
        responses={200: {"content": {"image/png": {}, "application/json": {}}}, 400: {}, 401: {}, 409: {}, 429: {},
                   503: {}, 504: {}},
    )
    async def generate(
        req: GenerateRequest,
        client: str = Depends(client_of),
        accept: str = Header("image/png"),
        channel: str | None = channel_query,
        x_channel: str | None = channel_header,
    ):
        """A PNG image (JSON with base64 PNGs when the client accepts only JSON, or for a batch).

        409: cancelled by a newer request on the same channel."""
        model, served_version, error = served()
        if model is None or state.jobs is None:
            return unavailable(error)
        req = with_default_negative(req)
        loop = asyncio.get_running_loop()
        finished: asyncio.Future = loop.create_future()

        def listener(event: JobEvent) -> None:
            if event.final:
                loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(event))

        t0 = time.perf_counter()
        try:
            job = state.jobs.submit(req, channel=channel_of(client, channel, x_channel), draw=model.generate_images,
                                    listener=listener)
        except QueueFull as exc:
            return queue_full(exc)
        try:
            event = await asyncio.wait_for(asyncio.shield(finished), settings.request_timeout_s)
        except TimeoutError:
            job.cancel("timed out")
            return JSONResponse(status_code=504, content={"detail": f"not drawn within {settings.request_timeout_s:g} s"})
        except asyncio.CancelledError:  # the client went away
            job.cancel("the client disconnected")
            raise
        headers = {"X-Model-Version": str(served_version), "X-Seed": str(req.seed)}
        if event.kind == "cancelled":
            return JSONResponse(status_code=409, content={"detail": f"cancelled: {event.reason}"}, headers=headers)
        if event.kind == "error":
            status, detail = error_reply(event.error)
            return JSONResponse(status_code=status, content={"detail": detail}, headers=headers)
        images = event.images or []
        metrics.images.inc(len(images))
        elapsed = time.perf_counter() - t0
        headers["X-Elapsed-S"] = f"{elapsed:.3f}"
        pngs = [png_bytes(im) for im in images]
        if req.batch > 1 or ("application/json" in accept and "image/png" not in accept):
            body = {
                "image_base64": base64.b64encode(pngs[0]).decode("ascii"),
                "media_type": "image/png",
                "width": images[0].width,
                "height": images[0].height,
                "model_name": name,
                "version": served_version,
                "style": req.style,
                "blend": req.blend,
                "styles": req.styles,
                "seed": req.seed,
                "steps": req.steps,
                "guidance_scale": req.guidance_scale,
                "negative_prompt": req.negative_prompt,
                "sampler": req.sampler,
                "batch": req.batch,
                "elapsed_s": round(elapsed, 4),
            }
            if req.batch > 1:
                body["images_base64"] = [base64.b64encode(p).decode("ascii") for p in pngs]
                body["seeds"] = [req.seed + i for i in range(len(pngs))]
            return JSONResponse(content=body, headers=headers)
        return Response(content=pngs[0], media_type="image/png", headers=headers)

    @app.post(
        "/generate/stream",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}, 401: {}, 429: {}, 503: {}},
    )
    async def generate_stream(
        req: GenerateRequest,
        client: str = Depends(client_of),
        channel: str | None = channel_query,
        x_channel: str | None = channel_header,
    ):
        """Server-sent events: `queued`, `preview` (step, total, small base64 PNG) after each step,
        then one `image` per image (base64 PNG, version, seed, parameters) — or `error` (status,
        detail) or `cancelled` (reason: e.g. replaced by a newer request on the channel)."""
        model, served_version, error = served()
        if model is None or state.jobs is None:
            return unavailable(error)
        req = with_default_negative(req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def listener(event: JobEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            job = state.jobs.submit(req, channel=channel_of(client, channel, x_channel), draw=model.generate_images,
                                    preview=until_it_fails(lambda latents: _b64png(model.preview(latents))),
                                    listener=listener)
        except QueueFull as exc:
            return queue_full(exc)
        parameters = req.model_dump(mode="json")

        async def stream():
            try:
                yield _sse("queued", {"job": job.id, "version": served_version, "pending": state.jobs.pending})
                while True:
                    batch = [await events.get()]
                    while not events.empty():
                        batch.append(events.get_nowait())
                    # Only the newest preview matters: a slow reader skips frames instead of lagging.
                    progress = [e for e in batch if e.kind == "progress"]
                    if progress:
                        last = progress[-1]
                        yield _sse("preview", {"step": last.step, "total": last.total, "image_base64": last.frame,
                                               "media_type": "image/png", "version": served_version})
                    final = next((e for e in batch if e.final), None)
                    if final is None:
                        continue
                    if final.kind == "images":
                        images = final.images or []
                        metrics.images.inc(len(images))
                        for i, image in enumerate(images):
                            yield _sse("image", {
                                "index": i, "count": len(images), "image_base64": _b64png(image),
                                "media_type": "image/png", "width": image.width, "height": image.height,
                                "model_name": name, "version": served_version, "seed": req.seed + i,
                                "parameters": parameters,
                            })
                    elif final.kind == "cancelled":
                        yield _sse("cancelled", {"reason": final.reason, "version": served_version})
                    else:
                        status, detail = error_reply(final.error)
                        yield _sse("error", {"status": status, "detail": detail, "version": served_version})
                    return
            finally:
                if not job.done:  # the client went away: free the worker
                    job.cancel("the client disconnected")

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"X-Model-Version": str(served_version), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


NO_AUTH_WARNING = "authentication is OFF (--no-auth): anyone who can reach {host}:{port} can generate; local use only"


def check_bind(host: str, settings: ServeSettings) -> None:
    """Refuse `--no-auth` on an interface other machines can reach (raises :class:`UnsafeBindError`)."""
    if not settings.auth and not _is_loopback(host):
        raise UnsafeBindError(
            f"refusing to serve {host} without authentication: --no-auth is for loopback only "
            "(--host 127.0.0.1); to serve other machines, keep auth on and give each client a key "
            "from `stunning keys create`"
        )


def run_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_uri: str | None = None,
    cfg: RegistryConfig | None = None,
    root: str | Path | None = None,
    device: str | None = None,
    settings: ServeSettings | None = None,
) -> None:
    """Serve with uvicorn until interrupted. Loopback only unless `host` says otherwise;
    `settings.auth=False` only on loopback (raises :class:`UnsafeBindError`)."""
    import uvicorn

    from stunning.config import RegistryConfig

    settings = settings or ServeSettings()
    check_bind(host, settings)
    app = create_app(model_uri, cfg or RegistryConfig(), root=root, device=device, settings=settings)
    if not settings.auth:
        log.warning(NO_AUTH_WARNING.format(host=host, port=port))
    elif app.state.keys.count() == 0:
        log.warning("no API keys in %s yet: every generation request gets 401 until you run `stunning keys create`",
                    app.state.keys.path)
    uvicorn.run(app, host=host, port=port, log_level="info")


def serve_command(
    host: str = "127.0.0.1",
    port: int = 8000,
    params_path: str | Path = "params.yaml",
    alias: str = "champion",
    device: str | None = None,
    settings: ServeSettings | None = None,
) -> None:
    """`stunning serve`: serve `<registry.model_name>@<alias>` of the project at `params_path`.

    The MLflow store's relative paths (and the default key file, `studio/keys.json`) are
    resolved against the folder of `params_path` (the project root), so the command works
    from anywhere. Raises `ConfigError` on bad params, :class:`UnsafeBindError` for
    `--no-auth` off loopback.
    """
    from stunning.config import load_params

    settings = settings or ServeSettings()
    check_bind(host, settings)
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
        settings=settings,
    )
