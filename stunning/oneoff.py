"""A one-off LoRA training run outside the DVC pipeline (what `stunning train` runs).

For a user with a base model and a folder of photos who wants an adapter now, without
params.yaml, DVC or MLflow: :func:`train_oneoff` stages the folder (images without a caption
get the instance prompt, e.g. "a photo in sks style"), runs the pipeline's own ingest and
curation on it with settings that keep a small personal set, then trains each style with the
pipeline's trainer (:func:`stunning.training.lora.train_style`). Everything intermediate lives
in ``<out>/.work/`` (staged photos, curated set, encoding cache, checkpoints), so running the
same command again after a crash or Ctrl-C resumes from the last checkpoint, and a finished
run is not repeated. Results: ``<out>/<style>/pytorch_lora_weights.safetensors`` (diffusers
layout, plus other tools' layouts on request) and ``<out>/summary.json``.

`--data` is either one folder of images (one style, named after the folder or `style`) or the
pipeline's layout of one sub-folder per style.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stunning.config import CurateConfig, DataConfig, TrainConfig
from stunning.io import write_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
METADATA_FILE = "metadata.jsonl"
# A personal set is small: below this many images every image trains (no val split).
MIN_IMAGES_FOR_VAL = 10
DEFAULT_RESOLUTION = 1024  # FLUX/SDXL/SD3 native size when the model folder does not say


class OneOffError(ValueError):
    """Bad input to a one-off run; the message names the file or option and the fix."""


@dataclass
class OneOffOptions:
    """What `stunning train` was asked for; None means "the sensible default" (see train_oneoff)."""

    model: str
    data: Path
    out: Path = Path("lora-out")
    prompt: str | None = None
    resolution: int | None = None
    batch_size: int | str = "auto"
    steps: int = 1000
    rank: int = 16
    learning_rate: float = 1e-4
    family: str | None = None
    device: str | None = None
    style: str | None = None
    trigger: list[str] = field(default_factory=list)
    mlflow: bool = False
    resume: bool = True
    formats: list[str] = field(default_factory=list)
    config_overrides: dict[str, Any] = field(default_factory=dict)
    model_config: str | None = None  # for single-file checkpoints: a folder or Hub id of the architecture


@dataclass
class StagedData:
    raw_dir: Path
    styles: list[str]
    images: dict[str, int]
    prompted: dict[str, int]  # images per style whose caption is the instance prompt


def style_name(text: str) -> str:
    """A folder name usable as a style id (lower case, [a-z0-9_-])."""
    name = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-")
    return name or "style"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _metadata_names(folder: Path) -> set[str]:
    """Image file names that `metadata.jsonl` in `folder` captions (bad lines are ingest's to report)."""
    import json

    names: set[str] = set()
    meta = folder / METADATA_FILE
    if meta.is_file():
        for line in meta.read_text(encoding="utf-8-sig").splitlines():
            try:
                entry = json.loads(line)
                if isinstance(entry.get("text"), str) and entry["text"].strip():
                    names.add(str(entry["file_name"]))
            except (json.JSONDecodeError, KeyError, AttributeError):
                continue
    return names


def stage_data(data: Path, work: Path, prompt: str | None, style: str | None = None) -> StagedData:
    """Copy the photos into the pipeline's raw layout under `work`, captioning with `prompt`.

    A flat folder of images is one style; otherwise each sub-folder with images is one
    (or only `style`). An image keeps its own caption (same-name .txt or metadata.jsonl);
    one without gets `prompt`; with neither, :class:`OneOffError` names the image.
    """
    data = Path(data)
    if not data.is_dir():
        raise OneOffError(f"--data {data}: not a folder. Pass the folder holding your photos.")
    if _images(data):
        sources = {style_name(style or data.name): data}
    else:
        sources = {style_name(d.name): d for d in sorted(data.iterdir()) if d.is_dir() and _images(d)}
        if style is not None:
            if style_name(style) not in sources:
                raise OneOffError(f"--style {style}: no sub-folder of {data} with that name holds images "
                                  f"(found: {sorted(sources) or 'none'})")
            sources = {style_name(style): sources[style_name(style)]}
    if not sources:
        raise OneOffError(f"--data {data}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or in its sub-folders.")
    raw = work / "raw"
    if raw.exists():
        shutil.rmtree(raw)
    images, prompted = {}, {}
    for name, folder in sources.items():
        dest = raw / name
        dest.mkdir(parents=True)
        captioned = _metadata_names(folder)
        if (folder / METADATA_FILE).is_file():
            shutil.copy2(folder / METADATA_FILE, dest / METADATA_FILE)
        prompted[name] = 0
        files = _images(folder)
        for img in files:
            shutil.copy2(img, dest / img.name)
            sidecar = img.with_suffix(".txt")
            if sidecar.is_file() and sidecar.read_text(encoding="utf-8", errors="replace").strip():
                shutil.copy2(sidecar, dest / sidecar.name)
            elif img.name not in captioned:
                if not prompt:
                    raise OneOffError(
                        f"{img}: has no caption (no {sidecar.name}, no {METADATA_FILE} entry). Either pass "
                        "--prompt \"a photo in sks style\" (the caption of every uncaptioned image) or write a "
                        "caption file next to each image."
                    )
                (dest / sidecar.name).write_text(prompt + "\n", encoding="utf-8")
                prompted[name] += 1
        images[name] = len(files)
    return StagedData(raw, sorted(sources), images, prompted)


def default_resolution(model_dir: Path) -> int:
    """The training size a model was made for, read from its configs (no weights loaded)."""
    import json

    from stunning.families import model_settings

    settings = model_settings(model_dir)
    if "resolution" in settings:
        return int(settings["resolution"])
    vae_cfg = model_dir / "vae" / "config.json"
    factor = 2 ** (len(json.loads(vae_cfg.read_text()).get("block_out_channels", [0] * 4)) - 1) if vae_cfg.is_file() else 8
    for denoiser in ("unet", "transformer"):  # UNets and SD3 transformers give it in latent pixels
        cfg = model_dir / denoiser / "config.json"
        size = json.loads(cfg.read_text()).get("sample_size") if cfg.is_file() else None
        if isinstance(size, int):
            return size * factor
    return DEFAULT_RESOLUTION


def train_config(opts: OneOffOptions, family) -> TrainConfig:
    """The TrainConfig of a one-off run: the options, the family's LoRA targets, then --config keys."""
    from stunning.config import ConfigError

    values: dict[str, Any] = {
        "rank": opts.rank,
        "alpha": float(opts.rank),
        "learning_rate": opts.learning_rate,
        "steps": opts.steps,
        "batch_size": opts.batch_size,
        "target_modules": list(family.default_lora_targets),
        "trigger_words": list(opts.trigger),
        "checkpoint_every": max(1, min(100, opts.steps // 4 or 1)),
        "keep_checkpoints": 2,
    }
    values.update(opts.config_overrides)
    try:
        return TrainConfig(**values)
    except Exception as exc:  # pydantic's ValidationError names the key
        raise ConfigError(f"train settings (options or --config): {exc}") from None


def _tracker(opts: OneOffOptions):
    """MLflow (a SQLite store in `<out>/mlruns/`, experiment `stunning-oneoff`) with --mlflow, else none."""
    if not opts.mlflow:
        return None  # train_style uses a NullTracker
    from stunning.config import RegistryConfig
    from stunning.tracking import MlflowTracker, configure_mlflow

    configure_mlflow(RegistryConfig(experiment="stunning-oneoff"), root=Path(opts.out))
    return MlflowTracker()


def train_oneoff(
    opts: OneOffOptions,
    *,
    echo: Callable[[str], None] = log.info,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Stage, ingest, curate and train; write `<out>/summary.json`; return the summary.

    `echo` receives the plan and the curation outcome as lines of text (the CLI prints them).
    `on_step(step, loss)` is passed to the trainer (an exception there stops the run; the
    next call resumes from the last checkpoint).
    """
    from stunning.data.curate import curate
    from stunning.data.ingest import ingest
    from stunning.families import get_family
    from stunning.families.source import detect_family, resolve_base
    from stunning.training.lora import train_style

    out = Path(opts.out)
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_base(opts.model, opts.family, config=opts.model_config, work_dir=work / "models")
    family_name = opts.family or detect_family(model_dir)
    family = get_family(family_name)
    from stunning.families import check_model_dir

    check_model_dir(model_dir, family.required_components)
    resolution = opts.resolution or default_resolution(model_dir)
    cfg = train_config(opts, family)

    staged = stage_data(Path(opts.data), work, opts.prompt, opts.style)
    n_min = min(staged.images.values())
    data_cfg = DataConfig(source="local", raw_dir=str(staged.raw_dir), styles=staged.styles, resolution=resolution,
                          min_size=max(8, resolution // 2))
    curate_cfg = CurateConfig(
        min_resolution=max(8, resolution // 2),
        val_fraction=0.1 if n_min >= MIN_IMAGES_FOR_VAL else 0.0,
        min_images_per_style=1,
        min_caption_words=1,
    )
    echo(f"model {model_dir} (family {family_name}), resolution {resolution} px, device {opts.device or 'auto'}")
    for s in staged.styles:
        echo(f"style {s}: {staged.images[s]} image(s), {staged.prompted[s]} captioned with the prompt")
    report = ingest(staged.raw_dir, work / "ingested", data_cfg)
    for r in report.rejections:
        echo(f"  skipped {r.file}: {r.reason} ({r.detail})")
    result = curate(work / "ingested", work / "curated", data_cfg, curate_cfg, validate=False)
    for d in result.drops:
        echo(f"  curation dropped {d.source}: {d.reason} ({d.detail})")
    kept = {s: sum(1 for r in result.rows if r["style"] == s) for s in staged.styles}
    echo("kept for training: " + ", ".join(f"{s} {n}" for s, n in kept.items()))
    echo(f"training {cfg.steps} steps, rank {cfg.rank}, lr {cfg.learning_rate:g}, batch size {cfg.batch_size}")

    if not opts.resume and (work / "checkpoints").exists():
        shutil.rmtree(work / "checkpoints")
    tracker = _tracker(opts)
    styles: dict[str, Any] = {}
    for s in staged.styles:
        summary = train_style(
            model_dir, family, work / "curated", s, cfg, out, tracker, work / "checkpoints", opts.device,
            sample_seeds=[0], samples_dir=out / "samples", run_name=f"oneoff-{s}",
            tags={"stage": "oneoff"}, on_step=on_step, progress=progress, cache_dir=work / "cache",
        )
        exported = {}
        for layout in opts.formats:
            from stunning.families.formats import convert_lora_file

            adapter = Path(summary["adapter"])
            exported[layout] = str(convert_lora_file(adapter, adapter.with_name(f"{s}-{layout}.safetensors"),
                                                     layout, family_name))
        styles[s] = {
            "adapter": summary["adapter"],
            "exports": exported,
            "images": kept[s],
            **{k: summary[k] for k in ("steps", "final_loss", "val_loss", "steps_per_s", "images_per_s",
                                       "peak_memory_mb", "batch_size", "batch_backoffs", "thermal_paused_s",
                                       "resumed_from_step", "seconds", "device", "mixed_precision")},
        }
    summary = {"model": str(model_dir), "family": family_name, "resolution": resolution, "styles": styles,
               "train": cfg.model_dump()}
    write_json(out / "summary.json", summary)
    return summary
