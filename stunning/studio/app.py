"""The style studio web UI (`stunning studio`): a Gradio app over the registry's served model.

One page: a prompt and a negative prompt, one slider per style of the served model (the
request-time blend weights, -2..2), seed, steps, guidance and sampler; a **live preview**
that shows the in-loop latents after every sampling step and then the final image; a gallery
of results whose captions and PNG files carry every parameter (the A1111 ``parameters``
chunk and the full JSON record, as `stunning generate` writes them); the registry's versions
side by side (champion, previous champion, other candidates: gate verdict and key metrics);
and saved blends (:mod:`stunning.studio.blends`) to save the current sliders under a name and
load them back.

:class:`Studio` is the engine and holds the event handlers (plain Python callables, tested
without a browser); :func:`build_studio` lays out the Gradio Blocks and wires the events;
:func:`launch_studio` serves it, behind API keys (:mod:`stunning.studio.keys`) when asked.

Why it behaves as it does:

- Drawing goes through one :class:`~stunning.studio.jobs.JobRunner` (one model, one worker),
  each browser session on its own *channel*: moving a slider submits a new job on the
  session's channel, which cancels the previous job at its next step, so the preview restarts
  at once instead of queueing behind a stale image. The render event therefore runs with no
  Gradio concurrency limit and ``trigger_mode="multiple"`` (the runner bounds the work).
- The negative prompt is pre-filled with the optimized default of the current style or blend
  (:func:`stunning.studio.negatives.default_negative`, else the model's own default) until
  the user types in it; "use default" hands it back to the automatic choice.
- The served model follows the registry alias as `stunning serve` does: a background thread
  polls it (and the Refresh button polls at once); a session's page picks the new model, its
  style sliders and the versions table up on its next timer tick.
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gradio as gr

from stunning.studio.generate import GenerateError, LoadedModel, a1111_parameters, load_model, png_with_parameters
from stunning.studio.jobs import JobRunner, QueueFull
from stunning.style_model import MAX_BLEND_STYLES, MAX_STYLE_WEIGHT, GenerateRequest

log = logging.getLogger(__name__)

__all__ = ["MIN_SLIDERS", "Studio", "StudioError", "build_studio", "check_studio_bind", "launch_studio"]

MIN_SLIDERS = 8  # style slider slots on the page (more when the model has more styles)
MAX_GALLERY = 48  # results a session's gallery keeps (newest first)
MAX_VERSION_COLUMNS = 6  # versions shown side by side
MAX_METRIC_ROWS = 12
_LOOPBACK_NAMES = ("localhost",)


class StudioError(ValueError):
    """The studio cannot start or do what was asked; the message says what to do."""


@dataclass
class RenderUpdate:
    """One thing a render reports: a preview frame (``kind="preview"``) or the final image."""

    kind: str  # "preview" | "image"
    image: Any = None  # PIL image (preview) or the PNG path (final)
    step: int | None = None
    total: int | None = None
    record: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    first_preview_s: float | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "image"


def _fmt_metric(value: str | None) -> str:
    try:
        return f"{float(value):.4g}" if value is not None else ""
    except ValueError:
        return str(value)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Studio:
    """The served model, the job runner, and the handlers of the studio page's events.

    `root` is the project root (saved blends in ``<root>/studio/blends``, default negatives in
    ``<root>/studio/negatives.yaml``, API keys in ``<root>/studio/keys.json``); the registry
    is the one `params_path` (default ``<root>/params.yaml``) configures.
    """

    def __init__(
        self,
        root: str | Path,
        model_uri: str | None = None,
        params_path: str | Path | None = None,
        device: str | None = None,
        *,
        poll_seconds: float = 5.0,
        max_pending: int = 16,
        outputs_dir: str | Path | None = None,
        blends_folder: str | Path | None = None,
        request_timeout_s: float = 600.0,
        loader: Callable[[str | None, Path, str | None], LoadedModel] = load_model,
    ) -> None:
        from stunning.config import load_params
        from stunning.serve import parse_model_uri
        from stunning.studio.blends import blends_dir

        self.root = Path(root).resolve()
        self.params_path = Path(params_path) if params_path is not None else self.root / "params.yaml"
        params = load_params(self.params_path)  # ConfigError names the file and key
        self.params = params
        try:
            name, self.alias, self.pinned_version = parse_model_uri(model_uri, params.registry.model_name)
        except ValueError as exc:
            raise StudioError(str(exc)) from None
        self.registry_cfg = params.registry.model_copy(update={"model_name": name})
        self.model_uri = model_uri
        self.device = device
        self.poll_seconds = float(poll_seconds)
        self.request_timeout_s = float(request_timeout_s)
        self.blends_folder = Path(blends_folder) if blends_folder is not None else blends_dir(self.root)
        self.outputs_dir = Path(outputs_dir) if outputs_dir is not None else Path(
            tempfile.mkdtemp(prefix="stunning-studio-"))
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        self.jobs = JobRunner(max_pending=max_pending, name="stunning-studio")
        self._loader = loader
        self._lock = threading.Lock()  # guards the served model and its error
        self._reload_lock = threading.Lock()
        self._loaded: LoadedModel | None = None
        self.error: str | None = None
        self._failed_version: int | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.reload()

    # ------------------------------------------------------------------ the served model
    @property
    def loaded(self) -> LoadedModel | None:
        with self._lock:
            return self._loaded

    @property
    def version(self) -> int | None:
        loaded = self.loaded
        return loaded.version if loaded is not None else None

    @property
    def styles(self) -> list[str]:
        loaded = self.loaded
        return sorted(loaded.model.styles) if loaded is not None else []

    @property
    def samplers(self) -> list[str]:
        loaded = self.loaded
        return ["default", *sorted(loaded.model.family.samplers)] if loaded is not None else ["default"]

    def reload(self) -> bool:
        """Resolve and load the model; swap it in only when it loaded. True: swapped.

        A failure keeps the last good model (if any) and records the reason in `error`."""
        with self._reload_lock:
            try:
                loaded = self._loader(self.model_uri, self.params_path, self.device)
            except GenerateError as exc:
                with self._lock:
                    self._failed_version = self._alias_version()
                    self.error = str(exc) if self._loaded is None else (
                        f"reload failed, still serving v{self._loaded.version}: {exc}")
                log.error("%s", self.error)
                return False
            try:  # fit the latent previewer now: the first preview does not wait for it
                loaded.model.previewer()
            except Exception:
                log.warning("v%s: no live previews (the previewer could not be fitted)", loaded.version, exc_info=True)
            with self._lock:
                previous = self._loaded.version if self._loaded is not None else None
                self._loaded, self.error, self._failed_version = loaded, None, None
            log.info("studio serving %s v%s%s", loaded.uri, loaded.version,
                     f" (was v{previous})" if previous is not None else "")
            return True

    def _alias_version(self) -> int | None:
        if self.alias is None:
            return self.pinned_version
        try:
            from stunning.registry import aliases

            return aliases(self.registry_cfg, self.root).get(self.alias)
        except Exception as exc:  # a locked or missing store: try again next time
            log.warning("checking @%s failed: %s", self.alias, exc)
            return None

    def poll(self) -> bool:
        """Load the alias's version when it moved (promotion or rollback). True: swapped."""
        if self.alias is None:
            return False
        current = self._alias_version()
        with self._lock:
            served = self._loaded.version if self._loaded is not None else None
            failed, have = self._failed_version, self._loaded is not None
        if current is None or (have and current == served) or current == failed:
            return False
        log.info("@%s now points at v%s (serving v%s): loading it", self.alias, current, served)
        return self.reload()

    def start_polling(self) -> None:
        """Follow the alias in a background thread every `poll_seconds` (0: never)."""
        if self.alias is None or self.poll_seconds <= 0 or self._poller is not None:
            return

        def follow() -> None:
            while not self._stop.wait(self.poll_seconds):
                try:
                    self.poll()
                except Exception:  # the poller must outlive any one failure
                    log.exception("polling @%s failed", self.alias)

        self._poller = threading.Thread(target=follow, name="stunning-studio-poll", daemon=True)
        self._poller.start()

    def close(self) -> None:
        """Stop polling and cancel every job."""
        self._stop.set()
        self.jobs.close()
        if self._poller is not None:
            self._poller.join(timeout=30)

    # ------------------------------------------------------------------ requests and rendering
    def weights_of(self, slots: Sequence[str], values: Sequence[float]) -> dict[str, float]:
        """The request-time blend of the sliders: non-zero weights of styles the model has."""
        have = set(self.styles)
        return {name: float(v) for name, v in zip(slots, values, strict=False)
                if name in have and v is not None and float(v) != 0.0}

    def default_negative_for(self, weights: Mapping[str, float]) -> str:
        """The negative prompt to pre-fill for `weights`: the optimized default saved for that
        style or blend (``studio/negatives.yaml``), else the model's own default, else ""."""
        from stunning.studio.blends import BlendFileError, list_blends
        from stunning.studio.negatives import NegativesInputError, default_negative

        targets: list[dict[str, Any]] = []
        if len(weights) == 1 and next(iter(weights.values())) == 1.0:
            targets.append({"style": next(iter(weights))})
        if weights:
            try:
                targets += [{"blend": b.name} for b in list_blends(self.blends_folder) if b.weights == dict(weights)]
            except BlendFileError as exc:
                log.warning("%s", exc)
            targets.append({"weights": dict(weights)})
        for target in targets:
            try:
                found = default_negative(self.root, **target)
            except NegativesInputError as exc:
                log.warning("default negative prompt not readable: %s", exc)
                break
            if found is not None:
                return found
        loaded = self.loaded
        return (loaded.model.default_negative_prompt or "") if loaded is not None else ""

    def make_request(
        self, prompt: str, negative: str | None, seed: float, steps: float, guidance: float, sampler: str | None,
        weights: Mapping[str, float],
    ) -> GenerateRequest:
        """A validated request; StudioError naming the field otherwise."""
        from pydantic import ValidationError

        if len(weights) > MAX_BLEND_STYLES:
            raise StudioError(f"{len(weights)} styles are off 0; a blend mixes at most {MAX_BLEND_STYLES}")
        fields: dict[str, Any] = {
            "prompt": (prompt or "").strip(), "negative_prompt": negative or "", "seed": int(seed or 0),
            "steps": int(steps), "guidance_scale": float(guidance),
            "sampler": None if sampler in (None, "", "default") else sampler,
        }
        if weights:
            fields["styles"] = dict(weights)
        try:
            return GenerateRequest(**fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "request"
            raise StudioError(f"{where}: {err['msg']}") from None

    def render(self, req: GenerateRequest, channel: str | None) -> Iterator[RenderUpdate]:
        """Draw `req` on the job runner: a preview after every step, then the final image (saved
        as a PNG with its parameters). A newer render on `channel` cancels this one: the
        iterator then simply ends. StudioError for a request the model cannot answer."""
        from stunning.studio.generate import sampler_label
        from stunning.studio.preview import until_it_fails
        from stunning.style_model import UnknownAdapterError

        loaded = self.loaded
        if loaded is None:
            raise StudioError(f"no model is served: {self.error}")
        model = loaded.model
        try:
            model.check(req)
        except UnknownAdapterError as exc:
            raise StudioError(str(exc)) from None
        t0 = time.perf_counter()
        try:
            job = self.jobs.submit(req, channel=channel, draw=model.generate_images, preview=until_it_fails(model.preview))
        except QueueFull as exc:
            raise StudioError(f"{exc} (the studio is busy)") from None
        first: float | None = None
        try:
            for event in job.events(timeout=self.request_timeout_s):
                if event.kind == "progress":
                    if event.frame is None:
                        continue
                    if first is None:
                        first = time.perf_counter() - t0
                    yield RenderUpdate("preview", event.frame, event.step, event.total,
                                       elapsed_s=time.perf_counter() - t0, first_preview_s=first)
                elif event.kind == "images":
                    elapsed = time.perf_counter() - t0
                    image = (event.images or [None])[0]
                    record = {
                        **req.model_dump(mode="json", exclude={"batch"}),
                        "sampler_label": sampler_label(model, req.sampler),
                        "width": image.width, "height": image.height,
                        "model_name": loaded.name, "model_version": loaded.version, "model_uri": loaded.uri,
                        "family": model.manifest.get("family"),
                        "elapsed_s": round(elapsed, 4),
                        "first_preview_s": round(first, 4) if first is not None else None,
                        "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    }
                    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
                    path = self.outputs_dir / f"{stamp}-{_slug(req.prompt)}-{req.seed}.png"
                    from stunning.io import atomic_write_bytes

                    atomic_write_bytes(path, png_with_parameters(image, record))
                    record["file"] = str(path)
                    yield RenderUpdate("image", str(path), record=record, elapsed_s=elapsed, first_preview_s=first)
                elif event.kind == "error":
                    exc = event.error
                    if isinstance(exc, UnknownAdapterError):
                        raise StudioError(str(exc))
                    log.error("generation failed", exc_info=exc)
                    raise StudioError(f"generation failed ({type(exc).__name__}: {str(exc)[:300]})")
                # "cancelled": a newer render on the channel replaced this one; nothing more to show
        except TimeoutError:
            raise StudioError(f"not drawn within {self.request_timeout_s:g} s") from None
        finally:
            if not job.done:  # the page went away (or this render was abandoned): free the worker
                job.cancel("the studio page stopped listening")

    # ------------------------------------------------------------------ registry view
    def versions_table(self) -> tuple[list[str], list[list[str]]]:
        """(headers, rows): the registry's versions side by side, champion first, then the
        previous champion, then the newest others; rows are alias, gate verdict and reasons,
        promotion, registration date, styles, and the gate metrics."""
        from stunning.registry import CHAMPION, PREVIOUS, list_versions

        try:
            versions = list_versions(self.registry_cfg, self.root)
        except Exception as exc:  # a locked or broken store: say so in the table
            return ["registry"], [[f"cannot be read: {type(exc).__name__}: {exc}"]]
        if not versions:
            return ["registry"], [[f"no versions of {self.registry_cfg.model_name} yet (run `dvc repro`)"]]

        def rank(v: dict[str, Any]) -> tuple[int, int]:
            return (0 if CHAMPION in v["aliases"] else 1 if PREVIOUS in v["aliases"] else 2, -v["version"])

        shown = sorted(versions, key=rank)[:MAX_VERSION_COLUMNS]
        served = self.version
        headers = [""] + [
            f"v{v['version']}" + "".join(f" @{a}" for a in v["aliases"]) + (" (served)" if v["version"] == served else "")
            for v in shown
        ]
        rows: list[list[str]] = []

        def row(label: str, values: list[str]) -> None:
            rows.append([label, *values])

        row("gate", [v["tags"].get("gate", "") for v in shown])
        row("promoted", [v["tags"].get("promoted", "") for v in shown])
        row("reasons", [v["tags"].get("gate_reasons", "") if v["tags"].get("gate_reasons") != "none" else ""
                        for v in shown])
        row("registered", [v["created"] for v in shown])
        row("styles", [v["tags"].get("styles", "").replace(",", ", ") for v in shown])
        metric_keys: list[str] = []
        for v in shown:
            for key in v["tags"].get("metric_keys", "").split(","):
                if key and key not in metric_keys:
                    metric_keys.append(key)
        for key in sorted(metric_keys)[:MAX_METRIC_ROWS]:
            row(key, [_fmt_metric(v["tags"].get(key)) for v in shown])
        return headers, rows

    def model_markdown(self) -> str:
        loaded = self.loaded
        if loaded is None:
            return f"**No model served.** {self.error or ''}"
        m = loaded.model
        text = (f"Serving **{loaded.name} v{loaded.version}** ({loaded.uri}) on {m.device}: "
                f"{m.resolution} px, family {m.manifest.get('family')}, styles {', '.join(sorted(m.styles)) or 'none'}")
        if self.error:
            text += f"\n\n**Warning:** {self.error}"
        return text

    # ------------------------------------------------------------------ saved blends
    def blend_names(self) -> list[str]:
        from stunning.studio.blends import BlendFileError, list_blends

        try:
            return [b.name for b in list_blends(self.blends_folder)]
        except BlendFileError as exc:
            log.warning("%s", exc)
            folder = self.blends_folder
            return sorted(p.stem for p in folder.glob("*.yaml") if not p.name.startswith(".")) if folder.is_dir() else []

    # ------------------------------------------------------------------ event handlers
    # Each takes and returns what the Gradio components hold; build_studio wires them.

    def slider_updates(self, slots: Sequence[str], n: int) -> list[Any]:
        """Updates of the `n` slider slots to show the served model's styles (at weight 0)."""
        styles = self.styles
        out = []
        for i in range(n):
            if i < len(styles):
                out.append(gr.update(label=styles[i], visible=True, value=0.0))
            else:
                out.append(gr.update(label=f"(unused {i + 1})", visible=False, value=0.0))
        return out

    def on_sync(self, slots: list[str] | None, n: int, session_version: int | None = None,
                force: bool = False) -> tuple[Any, ...]:
        """Everything that depends on the served model, for a session that shows
        `session_version` with sliders `slots`: (model text, versions table, sampler choices,
        saved blends, slots, version, *sliders). All `gr.skip()` when nothing changed and not
        `force`."""
        version = self.version
        if not force and version == session_version and session_version is not None:
            return tuple(gr.skip() for _ in range(6 + n))
        headers, rows = self.versions_table()
        styles = self.styles
        text = self.model_markdown()
        if len(styles) > n:
            text += (f"\n\n**Note:** this model has {len(styles)} styles; the page shows sliders for the first {n}. "
                     "Restart `stunning studio` for all of them.")
        new_slots = styles[:n]
        sliders = self.slider_updates(new_slots, n) if list(slots or []) != new_slots else [gr.skip()] * n
        samplers = self.samplers
        return (
            text,
            gr.update(value={"headers": headers, "data": rows}),
            gr.update(choices=samplers),
            gr.update(choices=self.blend_names()),
            new_slots,
            version,
            *sliders,
        )

    def on_refresh(self, slots: list[str] | None, n: int, session_version: int | None) -> tuple[Any, ...]:
        """The Refresh button: check the alias now (loading a moved champion), then sync."""
        try:
            self.poll()
        except Exception:
            log.exception("refreshing the served model failed")
        return self.on_sync(slots, n, session_version, force=True)

    def on_render(
        self, prompt: str, negative: str, negative_auto: bool, seed: float, steps: float, guidance: float,
        sampler: str, slots: list[str], items: list[dict[str, Any]], *weights: float, session: str = "default",
    ) -> Iterator[tuple[Any, Any, Any, Any, Any]]:
        """Live preview, then the final image: yields (preview image, status, negative prompt,
        gallery, gallery items) after every step and once at the end. The negative prompt box
        is refilled with the default of the current weights while it is automatic."""
        w = self.weights_of(slots, weights)
        negative_update: Any = gr.skip()
        if negative_auto:
            negative = self.default_negative_for(w)
            negative_update = negative
        try:
            req = self.make_request(prompt, negative, seed, steps, guidance, sampler, w)
            updates = self.render(req, channel=f"studio:{session}")
            for update in updates:
                if update.kind == "preview":
                    yield (update.image, f"step {update.step}/{update.total} · first preview after "
                           f"{update.first_preview_s:.2f} s", negative_update, gr.skip(), gr.skip())
                else:
                    record = update.record
                    caption = a1111_parameters(record)
                    items = [{"path": update.image, "caption": caption, "record": record}, *(items or [])][:MAX_GALLERY]
                    first = f", first preview after {update.first_preview_s:.2f} s" if update.first_preview_s else ""
                    status = f"done in {update.elapsed_s:.2f} s{first} · v{record['model_version']} · seed {req.seed}"
                    yield (update.image, status, negative_update, [(i["path"], i["caption"]) for i in items], items)
                negative_update = gr.skip()
        except StudioError as exc:
            raise gr.Error(str(exc)) from None

    def on_select(self, items: list[dict[str, Any]], index: int | None) -> dict[str, Any]:
        """The full record of the gallery image at `index`."""
        if index is None or not items or not 0 <= index < len(items):
            return {}
        return items[index]["record"]

    def on_negative_default(self, slots: list[str], *weights: float) -> tuple[str, bool]:
        """The "use default" button: the default negative of the current weights, automatic again."""
        return self.default_negative_for(self.weights_of(slots, weights)), True

    def on_save_blend(self, name: str, negative: str, slots: list[str], *weights: float) -> tuple[Any, str]:
        """Save the sliders (and the negative prompt, when there is one) as blend `name`:
        (saved-blend dropdown, status)."""
        from stunning.studio.blends import BlendFileError, SavedBlend, save_blend

        w = self.weights_of(slots, weights)
        if not w:
            raise gr.Error("every style slider is at 0: move at least one before saving a blend")
        name = (name or "").strip()
        try:
            path = save_blend(SavedBlend(name, w, negative.strip() or None if negative else None), self.blends_folder)
        except BlendFileError as exc:
            raise gr.Error(str(exc)) from None
        weights_text = ", ".join(f"{k} {v:+g}" for k, v in w.items())
        return gr.update(choices=self.blend_names(), value=name), f"saved blend **{name}** ({weights_text}) to `{path}`"

    def on_load_blend(self, name: str, slots: list[str], n: int) -> tuple[Any, ...]:
        """Load saved blend `name` into the sliders: (*sliders, negative prompt, automatic?, status)."""
        from stunning.studio.blends import BlendFileError, load_blend

        if not name:
            return (*[gr.skip()] * n, gr.skip(), gr.skip(), "")
        try:
            blend = load_blend(name, self.blends_folder)
        except BlendFileError as exc:
            raise gr.Error(str(exc)) from None
        missing = sorted(set(blend.weights) - set(slots))
        sliders = [gr.update(value=blend.weights.get(slots[i], 0.0)) if i < len(slots) else gr.skip()
                   for i in range(n)]
        status = f"loaded blend **{name}**"
        if missing:
            status += f"; the served model has no style {', '.join(missing)} (ignored)"
        if blend.negative_prompt is not None:
            return (*sliders, blend.negative_prompt, False, status)
        known = {k: v for k, v in blend.weights.items() if k in slots and v != 0}
        return (*sliders, self.default_negative_for(known), True, status)


# --------------------------------------------------------------------------- the page


def _theme() -> Any:
    # System fonts: the default theme would fetch Google Fonts, and the studio runs offline.
    sans = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(font=sans, font_mono=["ui-monospace", "Consolas", "monospace"])


def build_studio(
    root: str | Path,
    model_uri: str | None = None,
    params_path: str | Path | None = None,
    device: str | None = None,
    *,
    studio: Studio | None = None,
    poll_seconds: float = 5.0,
    outputs_dir: str | Path | None = None,
    max_pending: int = 16,
    steps: int | None = None,
) -> gr.Blocks:
    """The studio page over the model `model_uri` (default: the registry's @champion) of the
    project at `root`; `steps` is the page's initial step count (default ``validate.steps``).
    The returned Blocks carries its engine as ``.studio`` (close it with
    ``blocks.studio.close()`` after ``blocks.close()``)."""
    studio = studio or Studio(root, model_uri, params_path, device, poll_seconds=poll_seconds,
                              outputs_dir=outputs_dir, max_pending=max_pending)
    studio.start_polling()
    v = studio.params.validate_
    initial_steps = int(steps or v.steps)
    n = max(MIN_SLIDERS, len(studio.styles))
    styles = studio.styles

    with gr.Blocks(title="Stunning studio", analytics_enabled=False) as demo:
        gr.Markdown("## Stunning style studio")
        model_md = gr.Markdown(studio.model_markdown(), elem_id="model-info")
        slots = gr.State(styles[:n])
        session_version = gr.State(studio.version)
        negative_auto = gr.State(True)
        items = gr.State([])
        n_state = gr.State(n)
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(value=v.prompts[0] if v.prompts else "", label="Prompt", lines=2,
                                    elem_id="prompt")
                negative = gr.Textbox(value=studio.default_negative_for({}), label="Negative prompt", lines=1,
                                      elem_id="negative",
                                      info="pre-filled with the optimized default of the style/blend; type to override")
                use_default = gr.Button("use default negative", size="sm")
                with gr.Group():
                    gr.Markdown("**Styles** (request-time blend weights)")
                    sliders = [
                        gr.Slider(-MAX_STYLE_WEIGHT, MAX_STYLE_WEIGHT, value=0.0, step=0.05,
                                  label=styles[i] if i < len(styles) else f"(unused {i + 1})",
                                  visible=i < len(styles), elem_id=f"style-{i}", elem_classes=["style-slider"])
                        for i in range(n)
                    ]
                with gr.Row():
                    seed = gr.Number(value=0, label="Seed", precision=0, minimum=0, elem_id="seed")
                    steps = gr.Slider(1, 100, value=initial_steps, step=1, label="Steps", elem_id="steps")
                with gr.Row():
                    guidance = gr.Slider(0.0, 20.0, value=v.guidance_scale, step=0.5, label="Guidance",
                                         elem_id="guidance")
                    sampler = gr.Dropdown(studio.samplers, value="default", label="Sampler", elem_id="sampler")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                preview = gr.Image(label="Live preview", type="pil", format="png", interactive=False,
                                   elem_id="preview", height=320)
                status = gr.Markdown("", elem_id="status")
                with gr.Group():
                    with gr.Row():
                        blend_name = gr.Textbox(label="Blend name", placeholder="e.g. soft-noir", elem_id="blend-name",
                                                scale=2)
                        save = gr.Button("Save blend", elem_id="save-blend", scale=1)
                    saved = gr.Dropdown(studio.blend_names(), value=None, label="Saved blends (pick one to load it)",
                                        elem_id="saved-blends", allow_custom_value=False)
                    blend_status = gr.Markdown("", elem_id="blend-status")
        gallery = gr.Gallery(label="Results (captions and PNG files carry every parameter)", columns=6, height=260,
                             elem_id="gallery", format="png")
        record = gr.JSON(label="Parameters of the selected image", elem_id="record")
        with gr.Row():
            gr.Markdown("### Registry versions")
            refresh = gr.Button("Refresh", size="sm", elem_id="refresh")
        headers, rows = studio.versions_table()
        versions = gr.Dataframe(value={"headers": headers, "data": rows}, interactive=False, wrap=True,
                                elem_id="versions")
        timer = gr.Timer(studio.poll_seconds or 5.0, active=studio.poll_seconds > 0)

        # ---- events
        render_inputs = [prompt, negative, negative_auto, seed, steps, guidance, sampler, slots, items, *sliders]
        render_outputs = [preview, status, negative, gallery, items]

        def render(request: gr.Request, *args: Any):  # Gradio injects the request (by its annotation)
            session = getattr(request, "session_hash", None) or "default"
            yield from studio.on_render(*args, session=session)

        triggers = [generate.click, prompt.submit, negative.submit, seed.submit, steps.release, guidance.release,
                    sampler.input, *[s.release for s in sliders]]
        # No concurrency limit, every trigger runs: a new render cancels the session's previous
        # job through its JobRunner channel (the runner bounds the work).
        # Gradio's progress timer goes on the preview image only: "hidden" alone still puts it
        # over the status line until the first frame.
        live = {"concurrency_limit": None, "trigger_mode": "multiple", "show_progress": "minimal",
                "show_progress_on": [preview]}
        gr.on(triggers, render, render_inputs, render_outputs, **live)
        negative.input(lambda: False, None, negative_auto, show_progress="hidden", queue=False)
        use_default.click(studio.on_negative_default, [slots, *sliders], [negative, negative_auto],
                          show_progress="hidden", show_progress_on=[use_default])

        def select(items_value: list, evt: gr.SelectData):
            return studio.on_select(items_value, evt.index)

        gallery.select(select, items, record, show_progress="hidden", show_progress_on=[gallery])
        save.click(studio.on_save_blend, [blend_name, negative, slots, *sliders], [saved, blend_status],
                   show_progress="hidden", show_progress_on=[save])
        saved.input(lambda name, sl, k: studio.on_load_blend(name, sl, k), [saved, slots, n_state],
                    [*sliders, negative, negative_auto, blend_status], show_progress="hidden",
                    show_progress_on=[saved]).then(render, render_inputs, render_outputs, **live)
        sync_outputs = [model_md, versions, sampler, saved, slots, session_version, *sliders]
        quiet = {"show_progress": "hidden", "show_progress_on": [refresh]}
        refresh.click(studio.on_refresh, [slots, n_state, session_version], sync_outputs, show_progress="minimal",
                      show_progress_on=[versions])
        timer.tick(studio.on_sync, [slots, n_state, session_version], sync_outputs, **quiet)
        demo.load(lambda sl, k, ver: studio.on_sync(sl, k, ver, force=True), [slots, n_state, session_version],
                  sync_outputs, **quiet)
    demo.studio = studio  # type: ignore[attr-defined]
    return demo


# --------------------------------------------------------------------------- serving


def check_studio_bind(host: str, auth: bool | None, key_count: int, keys_path: Path) -> bool:
    """Whether the studio asks for an API key: `auth` None means "off on loopback, on elsewhere".

    Raises :class:`stunning.serve.UnsafeBindError` for ``auth=False`` off loopback and
    :class:`StudioError` when keys are required but none exist."""
    from stunning.serve import UnsafeBindError

    loopback = _is_loopback(host)
    if auth is False and not loopback:
        raise UnsafeBindError(
            f"refusing to serve the studio on {host} without authentication: --no-auth is for loopback only "
            "(--host 127.0.0.1); to let other machines in, keep auth on and give each user a key from "
            "`stunning keys create`"
        )
    need = (not loopback) if auth is None else auth
    if need and key_count == 0:
        raise StudioError(
            f"the studio on {host} needs API keys and {keys_path} has none: create one with `stunning keys create` "
            "(users sign in with any user name and the key as password), or bind --host 127.0.0.1"
        )
    return need


def key_auth(keys: Any) -> Callable[[str, str], bool]:
    """Gradio's `auth=` check: any user name (e.g. "key"), an API key of `keys` as password."""

    def check(username: str, password: str) -> bool:
        try:
            return keys.verify(password) is not None
        except Exception as exc:  # an unreadable key file lets nobody in
            log.error("API key check failed: %s", exc)
            return False

    return check


AUTH_MESSAGE = "Sign in with any user name (e.g. key) and an API key from `stunning keys create` as the password."


def launch_studio(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    *,
    keys: Any = None,
    block: bool = True,
    **launch_kwargs: Any,
) -> tuple[Any, str, Any]:
    """Serve `demo` on `host:port` (never a public share link); with `keys` (a KeyStore) every
    visitor signs in with an API key. Returns Gradio's (app, local URL, share URL)."""
    studio: Studio | None = getattr(demo, "studio", None)
    allowed = [str(studio.outputs_dir)] if studio is not None else []
    return demo.launch(
        server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
        auth=key_auth(keys) if keys is not None else None, auth_message=AUTH_MESSAGE if keys is not None else None,
        allowed_paths=allowed, theme=_theme(), quiet=True, **launch_kwargs,
    )


def studio_command(
    host: str = "127.0.0.1",
    port: int = 7860,
    params_path: str | Path = "params.yaml",
    model_uri: str | None = None,
    device: str | None = None,
    auth: bool | None = None,
    keys_path: str | Path | None = None,
    poll_seconds: float = 5.0,
    outputs_dir: str | Path | None = None,
    steps: int | None = None,
) -> None:
    """`stunning studio`: check the bind, build the page over the project of `params_path`, serve
    until interrupted. Raises StudioError / UnsafeBindError / ConfigError with the fix."""
    from stunning.studio.keys import KeyStore, default_keys_path

    params_path = Path(params_path)
    if not params_path.is_file():
        raise StudioError(f"{params_path}: no such file; run from the project folder or pass --params")
    root = params_path.resolve().parent
    keys = KeyStore(keys_path or default_keys_path(root))
    need = check_studio_bind(host, auth, keys.count() if auth is not False else 0, keys.path)
    demo = build_studio(root, model_uri, params_path, device, poll_seconds=poll_seconds, outputs_dir=outputs_dir,
                        steps=steps)
    log.info("style studio on http://%s:%s (%s; Ctrl+C to stop)", host, port,
             "sign in with an API key" if need else "no sign-in")
    try:
        launch_studio(demo, host, port, keys=keys if need else None, block=True)
    finally:
        demo.studio.close()  # type: ignore[attr-defined]
        keys.flush()

