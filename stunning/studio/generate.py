"""Batch generation to a folder of PNGs (`stunning generate`), resumable, parameters embedded.

For every prompt (from the command line or a file, one per line) and every seed
``seed, seed+1, ..., seed+count-1`` one image is drawn by the registry's model
(:class:`stunning.style_model.StyleModel`, the same path as `stunning serve`) with a style, a
request-time blend (``--style noir=0.7 --style impressionist=-0.3``) or a saved studio blend
(``--blend NAME``, :mod:`stunning.studio.blends`; else a blend registered with the model).

Each PNG carries its parameters twice: a ``parameters`` text chunk in the AUTOMATIC1111
layout that the common UIs and image browsers read::

    a red dress on a white background
    Negative prompt: blurry
    Steps: 20, Sampler: Euler, CFG scale: 4.0, Seed: 3, Size: 32x32, Model: stunning-style, Model version: 2, Styles: noir:0.7 impressionist:-0.3

and a ``stunning`` text chunk holding the full record as JSON (the same record as its line in
``index.jsonl``). The index is rewritten atomically after each image, so an interrupted run
leaves only complete entries; rerunning skips every image whose entry (same model version and
parameters) and file are present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stunning.io import atomic_write_bytes
from stunning.style_model import GenerateRequest

if TYPE_CHECKING:
    from PIL import Image

    from stunning.style_model import StyleModel

log = logging.getLogger(__name__)

__all__ = [
    "INDEX_FILE", "GenerateError", "GenerateSpec", "LoadedModel", "a1111_parameters", "generate_to_folder",
    "load_model", "parse_style_args", "plan_requests", "read_index", "read_prompts", "sampler_label",
]

INDEX_FILE = "index.jsonl"
PARAMETERS_CHUNK = "parameters"  # the AUTOMATIC1111 / Forge / ComfyUI-readers' text chunk
JSON_CHUNK = "stunning"

# A1111's names for the samplers the families offer (`Family.samplers`).
_A1111_SAMPLERS = {"euler": "Euler", "euler-ancestral": "Euler a", "dpm++": "DPM++ 2M"}


class GenerateError(ValueError):
    """Bad generation input (prompt file, style argument, blend, model); the message says what to fix."""


@dataclass
class GenerateSpec:
    """What to generate: every prompt x `count` seeds, with one adapter choice for all."""

    prompts: list[str]
    styles: dict[str, float] | None = None  # request-time blend
    blend: str | None = None  # a blend registered with the model
    negative_prompt: str | None = None
    seed: int = 0
    count: int = 1
    steps: int = 20
    guidance_scale: float = 4.0
    sampler: str | None = None


@dataclass
class LoadedModel:
    model: StyleModel
    name: str
    version: int | None
    uri: str
    info: dict[str, Any] = field(default_factory=dict)


def read_prompts(prompts: Iterable[str] = (), prompt_file: str | Path | None = None) -> list[str]:
    """Prompts from arguments, then from `prompt_file` (one per line; blank and ``#`` lines skipped)."""
    out = [p.strip() for p in prompts if p and p.strip()]
    if prompt_file is not None:
        path = Path(prompt_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise GenerateError(f"{path}: cannot read the prompt file ({exc}); give a UTF-8 text file, "
                                "one prompt per line") from None
        for n, line in enumerate(lines, 1):
            text = line.strip()
            if text and not text.startswith("#"):
                if len(text) > 2000:
                    raise GenerateError(f"{path}:{n}: prompt of {len(text)} characters; at most 2000")
                out.append(text)
    if not out:
        raise GenerateError("no prompt given: pass PROMPT arguments or --prompts FILE (one prompt per line)")
    return out


def parse_style_args(values: Iterable[str]) -> dict[str, float] | None:
    """``["noir=0.7", "impressionist=-0.3", "pastel"]`` -> ``{"noir": 0.7, ...: -0.3, "pastel": 1.0}``."""
    out: dict[str, float] = {}
    for value in values:
        name, sep, weight = value.partition("=")
        name = name.strip()
        if not name:
            raise GenerateError(f"--style {value!r}: give NAME or NAME=WEIGHT, e.g. --style noir=0.7")
        try:
            w = float(weight) if sep else 1.0
        except ValueError:
            raise GenerateError(f"--style {value!r}: weight {weight!r} is not a number") from None
        if name in out:
            raise GenerateError(f"--style {name} given twice")
        out[name] = w
    return out or None


def plan_requests(spec: GenerateSpec) -> list[GenerateRequest]:
    """One validated request per (prompt, seed); GenerateError naming the limit otherwise."""
    from pydantic import ValidationError

    reqs = []
    for prompt in spec.prompts:
        for i in range(spec.count):
            fields = {
                "prompt": prompt, "seed": spec.seed + i, "steps": spec.steps, "guidance_scale": spec.guidance_scale,
                "styles": spec.styles, "blend": spec.blend, "negative_prompt": spec.negative_prompt,
                "sampler": spec.sampler,
            }
            try:
                reqs.append(GenerateRequest(**{k: v for k, v in fields.items() if v is not None}))
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise GenerateError(f"{where}: {err['msg']}") from None
    return reqs


def sampler_label(model: StyleModel, sampler: str | None) -> str:
    """The sampler's A1111 name (``Euler``, ``Euler a``, ``DPM++ 2M``); the model's own for None."""
    if sampler and sampler != "default":
        return _A1111_SAMPLERS.get(sampler, sampler)
    scheduler = getattr(model.pipe, "scheduler", None)
    cls = type(scheduler).__name__
    if "Euler" in cls:
        stochastic = bool(getattr(getattr(scheduler, "config", {}), "get", lambda *_: False)("stochastic_sampling"))
        return "Euler a" if stochastic or "Ancestral" in cls else "Euler"
    if "DPMSolverMultistep" in cls:
        return "DPM++ 2M"
    return cls or "default"


def _a1111_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ",:\n") else text


def a1111_parameters(record: dict[str, Any]) -> str:
    """The AUTOMATIC1111 ``parameters`` text of an index record (prompt, negative, settings line)."""
    lines = [record["prompt"]]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    settings = [
        ("Steps", record["steps"]),
        ("Sampler", record["sampler_label"]),
        ("CFG scale", record["guidance_scale"]),
        ("Seed", record["seed"]),
        ("Size", f"{record['width']}x{record['height']}"),
        ("Model", _a1111_value(record["model_name"])),
    ]
    if record.get("model_version") is not None:
        settings.append(("Model version", record["model_version"]))
    if record.get("styles"):
        settings.append(("Styles", " ".join(f"{k}:{v:g}" for k, v in record["styles"].items())))
    elif record.get("style") or record.get("blend"):
        settings.append(("Styles", f"{record.get('style') or record.get('blend')}:1"))
    lines.append(", ".join(f"{k}: {v}" for k, v in settings))
    return "\n".join(lines)


def _key(req: GenerateRequest, model_name: str, model_version: int | None) -> str:
    """Identity of one image: the model version and every request field (what resuming compares)."""
    payload = {"model": model_name, "version": model_version, **req.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "image"


def read_index(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `out_dir/index.jsonl` (a line that does not parse is ignored with a warning)."""
    path = Path(out_dir) / INDEX_FILE
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            log.warning("%s:%d: not a JSON record; ignored (the image will be generated again)", path, n)
            continue
        if isinstance(rec, dict) and "key" in rec and "file" in rec:
            records.append(rec)
    return records


def png_with_parameters(image: Image.Image, record: dict[str, Any]) -> bytes:
    """PNG bytes of `image` with the ``parameters`` (A1111) and ``stunning`` (JSON) text chunks."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PARAMETERS_CHUNK, a1111_parameters(record))  # iTXt by itself when not Latin-1
    info.add_text(JSON_CHUNK, json.dumps(record, sort_keys=True, ensure_ascii=False))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def generate_to_folder(
    loaded: LoadedModel,
    requests: list[GenerateRequest],
    out_dir: str | Path,
    *,
    on_image: Callable[[int, int, dict[str, Any], bool], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Generate every request not yet in `out_dir/index.jsonl`; returns a summary.

    `on_image(done, total, record, skipped)` after each image (skipped: already there);
    `on_step(step, total_steps)` after each sampling step. Each image is written atomically,
    then its record is added to the index (rewritten atomically), so a crash never leaves an
    index entry without its complete file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = read_index(out)
    done_keys = {r["key"] for r in records if (out / r["file"]).is_file()}
    model = loaded.model
    from stunning.style_model import UnknownAdapterError

    try:  # every request is checked before the first image, not halfway through a batch
        for req in requests:
            model.check(req)
    except UnknownAdapterError as exc:
        raise GenerateError(str(exc)) from None
    size = model.resolution
    generated = skipped = 0
    elapsed = 0.0
    step_cb = (lambda step, total, latents: on_step(step, total)) if on_step else None
    for i, req in enumerate(requests, 1):
        key = _key(req, loaded.name, loaded.version)
        if key in done_keys:
            skipped += 1
            if on_image:
                on_image(i, len(requests), next(r for r in records if r["key"] == key), True)
            continue
        t0 = time.perf_counter()
        image = model.generate(req, on_step=step_cb)
        dt = time.perf_counter() - t0
        elapsed += dt
        record = {
            "key": key,
            "file": f"{_slug(req.prompt)}-{req.seed}-{key[:8]}.png",
            **req.model_dump(mode="json", exclude={"batch"}),
            "sampler_label": sampler_label(model, req.sampler),
            "width": image.width,
            "height": image.height,
            "model_name": loaded.name,
            "model_version": loaded.version,
            "model_uri": loaded.uri,
            "family": model.manifest.get("family"),
            "elapsed_s": round(dt, 4),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if image.size != (size, size):  # pragma: no cover - the family contract says otherwise
            log.warning("image %s is %s, the model's size is %d", record["file"], image.size, size)
        atomic_write_bytes(out / record["file"], png_with_parameters(image, record))
        records = [r for r in records if r["key"] != key] + [record]
        atomic_write_bytes(out / INDEX_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
        done_keys.add(key)
        generated += 1
        if on_image:
            on_image(i, len(requests), record, False)
    return {
        "out_dir": str(out),
        "images": len(requests),
        "generated": generated,
        "skipped": skipped,
        "seconds_per_image": round(elapsed / generated, 4) if generated else None,
        "model": loaded.uri,
        "model_version": loaded.version,
    }


def load_model(
    model_uri: str | None,
    params_path: str | Path = "params.yaml",
    device: str | None = None,
) -> LoadedModel:
    """Resolve `model_uri` (default ``models:/<registry.model_name>@champion``) in the project of
    `params_path` and load it, as `stunning serve` does. GenerateError when it cannot be."""
    from stunning.config import load_params
    from stunning.registry import NoChampionError, RegistryError, model_artifacts, resolve
    from stunning.serve import parse_model_uri
    from stunning.style_model import ModelLoadError, StyleModel

    params_path = Path(params_path)
    cfg = load_params(params_path).registry  # ConfigError names the file and key
    root = params_path.resolve().parent
    try:
        name, alias, version = parse_model_uri(model_uri, cfg.model_name)
    except ValueError as exc:
        raise GenerateError(str(exc)) from None
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    try:
        found, model_dir = resolve(cfg, alias=alias, root=root, model_name=name, version=version)
    except NoChampionError as exc:
        raise GenerateError(f"{exc} Run `dvc repro` first (the register stage promotes a candidate that passes "
                            "the gate), or pass --model models:/<name>/<version>.") from None
    except RegistryError as exc:
        raise GenerateError(f"{uri}: {exc}") from None
    try:
        model = StyleModel.load(model_artifacts(model_dir), device=device)
    except ModelLoadError as exc:
        raise GenerateError(f"{uri} (v{found}) cannot be loaded: {exc}") from None
    return LoadedModel(model=model, name=name, version=found, uri=uri,
                       info={"styles": sorted(model.styles), "blends": sorted(model.blends)})


def apply_blend(spec: GenerateSpec, blend: str, loaded: LoadedModel, blends_folder: str | Path | None) -> GenerateSpec:
    """`--blend NAME`: a saved studio blend (its weights, and its negative prompt unless one was
    given), else a blend registered with the model. GenerateError listing both otherwise."""
    from stunning.studio.blends import BlendFileError, blends_dir, check_name, load_blend

    folder = Path(blends_folder) if blends_folder is not None else blends_dir()
    try:
        check_name(blend)
        if (folder / f"{blend}.yaml").is_file():
            saved = load_blend(blend, folder)
            spec.styles = dict(saved.weights)
            if spec.negative_prompt is None:
                spec.negative_prompt = saved.negative_prompt
            return spec
    except BlendFileError as exc:
        raise GenerateError(str(exc)) from None
    if blend in loaded.model.blends:
        spec.blend = blend
        return spec
    saved_names = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    raise GenerateError(f"no blend {blend!r}: saved blends in {folder}: {saved_names}; "
                        f"blends of {loaded.uri}: {sorted(loaded.model.blends)}")
