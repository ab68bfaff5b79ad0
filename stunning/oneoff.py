"""A one-off LoRA training run outside the DVC pipeline (what `stunning train` runs).

For a user with a base model and a folder of photos who wants an adapter now, without
params.yaml, DVC or MLflow: :func:`train_oneoff` stages the folder (images without a caption
get the instance prompt, e.g. "a photo in sks style"), runs the pipeline's own ingest and
curation on it with settings that keep a small personal set, then trains each style with the
pipeline's trainer (:func:`stunning.training.trainer.train_style`). Everything intermediate lives
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
from collections import Counter
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
MLFLOW_EXPERIMENT = "stunning-oneoff"
DEFAULT_RESOLUTION = 1024  # FLUX/SDXL/SD3 native size when the model folder does not say
# The only train settings in which a one-off run differs from the pipeline's (TrainConfig's
# defaults, which are params.yaml's and tuned for the 32-px embedded model): a real model at
# its native size wants a smaller learning rate and a longer run, and an unknown machine a
# probed batch size. Every other setting is TrainConfig's, the LoRA targets are the model
# family's (`default_lora_targets`), alpha follows the rank and checkpoint_every the steps.
ONEOFF_TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 1000, "learning_rate": 1e-4, "batch_size": "auto",
    # The pipeline's 10 % caption dropout is tuned for the micro model's guidance; a one-off run
    # on a user's model keeps every caption, as the diffusers example scripts do.
    "caption_dropout": 0.0,
}


def oneoff_default(key: str) -> Any:
    """The default of train setting `key` in a one-off run (for option help and for train_config)."""
    if key in ONEOFF_TRAIN_DEFAULTS:
        return ONEOFF_TRAIN_DEFAULTS[key]
    return TrainConfig.model_fields[key].get_default(call_default_factory=True)


class OneOffError(ValueError):
    """Bad input to a one-off run; the message names the file or option and the fix."""


@dataclass
class OneOffOptions:
    """What `stunning train` was asked for; None means the default (:func:`oneoff_default`)."""

    model: str
    data: Path
    out: Path = Path("lora-out")
    prompt: str | None = None
    resolution: int | None = None
    batch_size: int | str | None = None
    steps: int | None = None
    rank: int | None = None
    learning_rate: float | None = None
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
    sources: dict[str, Path] = field(default_factory=dict)  # style -> the user's folder

    def user_path(self, rel: str) -> str:
        """The user's own file for a path relative to `raw_dir` (`<style>/<name>`), for messages."""
        style, _, name = rel.partition("/")
        return str(self.sources[style] / name) if style in self.sources and name else rel


class RunLocked(OneOffError):
    """Another `stunning train` is writing to the same `--out`."""


LOCK_NAME = "train.lock"


class RunLock:
    """An exclusive lock on one `--out` folder (`<out>/.work/train.lock`), held while a run lives.

    An OS lock (`fcntl.flock`): the kernel drops it when the process ends however it ends, so
    the lock of a killed run never blocks the next one; the file holds the holder's pid and
    command line for the message a second run gets.
    """

    def __init__(self, work: Path) -> None:
        self.path = Path(work) / LOCK_NAME
        self._fh: Any = None

    def acquire(self) -> RunLock:
        import json
        import os
        import sys

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+")
        try:
            _lock(fh, True)
        except OSError:
            fh.seek(0)
            try:
                holder = json.loads(fh.read() or "{}")
            except ValueError:
                holder = {}
            fh.close()
            who = f"pid {holder['pid']}" if holder.get("pid") else "another process"
            cmd = f": {holder['cmd']}" if holder.get("cmd") else ""
            raise RunLocked(f"{self.path.parent.parent} is in use by another `stunning train` run ({who}{cmd}). Wait "
                            f"for it to finish or stop it, or train into another --out (lock: {self.path}).") \
                from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "cmd": " ".join(sys.argv)[:300]}))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.seek(0)
            self._fh.truncate()  # no pid left behind that reads like a live holder
            _lock(self._fh, False)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock(fh, take: bool) -> None:
    """Take (non-blocking: OSError when held) or release the OS lock on an open file."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK if take else msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fh.fileno(), (fcntl.LOCK_EX | fcntl.LOCK_NB) if take else fcntl.LOCK_UN)


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
        sources = {}
        for d in sorted(data.iterdir()):
            if d.is_dir() and _images(d):
                if style_name(d.name) in sources:
                    raise OneOffError(f"--data {data}: sub-folders {sources[style_name(d.name)].name!r} and "
                                      f"{d.name!r} both make the style name {style_name(d.name)!r}; rename one")
                sources[style_name(d.name)] = d
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
    return StagedData(raw, sorted(sources), images, prompted, dict(sources))


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


def size_multiple(model_dir: Path, family) -> int:
    """What the training size must be a multiple of for this model, read from its configs.

    The same rule as :func:`stunning.training.encoding.size_multiple` (VAE factor x patch size, x2
    where latents are packed 2x2, x a UNet's own downsampling), without loading the weights, so
    a bad --resolution is refused before anything is staged.
    """
    import json

    def config(component: str) -> dict:
        path = model_dir / component / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    vae = config("vae")
    factor = 2 ** (len(vae["block_out_channels"]) - 1) if vae.get("block_out_channels") else 8
    denoiser = config("transformer") or config("unet")
    patch = denoiser.get("patch_size") or 1
    factor *= patch if isinstance(patch, int) else 1
    down = denoiser.get("down_block_types")
    if isinstance(down, list) and down:
        factor *= 2 ** (len(down) - 1)
    if hasattr(family.pipeline_class(), "_pack_latents"):
        factor *= 2
    return factor


def train_config(opts: OneOffOptions, family) -> TrainConfig:
    """The TrainConfig of a one-off run, each key from the first that sets it: the options
    (those not None), `config_overrides` (a --config file), the one-off defaults
    (:data:`ONEOFF_TRAIN_DEFAULTS`, the family's LoRA targets), TrainConfig's defaults.

    `alpha` follows the final rank and the checkpoint interval the final step count unless
    the overrides set them.
    """
    from pydantic import ValidationError

    from stunning.config import ConfigError

    given = {key: value for key, value in (("rank", opts.rank), ("learning_rate", opts.learning_rate),
                                           ("steps", opts.steps), ("batch_size", opts.batch_size))
             if value is not None}
    if opts.trigger:
        given["trigger_words"] = list(opts.trigger)
    values: dict[str, Any] = {
        **ONEOFF_TRAIN_DEFAULTS,
        "target_modules": list(family.default_lora_targets),
        **opts.config_overrides,
        **given,
    }
    rank = values.get("rank", oneoff_default("rank"))
    if isinstance(rank, int) and "alpha" not in values:
        values["alpha"] = float(rank)
    if isinstance(values["steps"], int) and "checkpoint_every" not in values:
        values["checkpoint_every"] = max(1, min(100, values["steps"] // 4))
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<top level>"
            msg = "unknown key (see the train: section of params.yaml)" if err["type"] == "extra_forbidden" \
                else err["msg"]
            problems.append(f"{key}: {msg}")
        raise ConfigError("train settings (options or --config): " + "; ".join(problems)) from None


def _tracker(opts: OneOffOptions):
    """(tracker, tracking URI): MLflow in a SQLite store under `<out>/mlruns/` with --mlflow, else (None, None).

    The project's conventions (:class:`~stunning.config.RegistryConfig`: ``sqlite:///mlruns/mlflow.db``
    and ``mlruns/artifacts``), resolved against the output folder instead of the project root.
    """
    if not opts.mlflow:
        return None, None  # train_style uses a NullTracker
    import mlflow

    from stunning.config import RegistryConfig
    from stunning.tracking import MlflowTracker, configure_mlflow

    configure_mlflow(RegistryConfig(experiment=MLFLOW_EXPERIMENT), root=Path(opts.out))
    return MlflowTracker(), mlflow.get_tracking_uri()


def check_options(opts: OneOffOptions) -> str:
    """Refuse bad options before any work (a typo must not cost a training run); return the device.

    The device is resolved here ("auto" -> cuda/mps/cpu) so the plan names the one used.
    """
    from stunning.device import select_device
    from stunning.families import available
    from stunning.lora_formats import LAYOUTS

    if opts.family is not None and opts.family not in available():
        raise OneOffError(f"--family {opts.family}: not a model family this project trains; use one of "
                          f"{', '.join(available())}, or leave it out to detect it from the model")
    for layout in opts.formats:
        if layout not in LAYOUTS:
            raise OneOffError(f"--export {layout}: unknown LoRA layout; use one of {', '.join(LAYOUTS)}")
    try:
        return str(select_device(opts.device))
    except ValueError as exc:
        raise OneOffError(f"--device {opts.device}: {exc}") from None


def _unusable(staged: StagedData, style: str, reasons: list[str], stage: str, resolution: int) -> OneOffError:
    """The error for a style none of whose photos survived `stage` (ingest or curation)."""
    counts = ", ".join(f"{n} {r}" for r, n in sorted(Counter(reasons).items())) or "none left"
    hint = ""
    if "too_small" in reasons or "low_resolution" in reasons:
        hint = f" Use photos at least {max(8, resolution // 2)} px on the shorter side, or a smaller --resolution."
    elif "near_duplicate" in reasons or "duplicate_file" in reasons:
        hint = " Add photos that differ from each other."
    return OneOffError(
        f"--data {staged.sources[style]}: no photo of style {style!r} is left to train on after {stage} "
        f"({counts}; each is listed above).{hint}"
    )


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
    next call resumes from the last checkpoint). Bad input raises :class:`OneOffError`,
    :class:`~stunning.families.ModelNotFoundError`, :class:`~stunning.config.ConfigError` or
    :class:`~stunning.data.DataError` before training starts.
    """
    device = check_options(opts)
    out = Path(opts.out)
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    with RunLock(work):  # a second run into the same --out fails here instead of training from step 0 too
        return _train_locked(opts, out, work, device, echo, on_step, progress)


def _train_locked(opts: OneOffOptions, out: Path, work: Path, device: str, echo: Callable[[str], None],
                  on_step: Callable[[int, float], None] | None, progress: bool | None) -> dict[str, Any]:
    from stunning.data.curate import CurationFailed, curate
    from stunning.data.ingest import ingest
    from stunning.families import check_model_dir, get_family
    from stunning.model_source import detect_family, resolve_base
    from stunning.training.trainer import train_style

    model_dir = resolve_base(opts.model, opts.family, config=opts.model_config, work_dir=work / "models")
    family_name = opts.family or detect_family(model_dir)
    family = get_family(family_name)
    check_model_dir(model_dir, family.required_components)
    resolution = opts.resolution or default_resolution(model_dir)
    multiple = size_multiple(model_dir, family)
    if resolution % multiple:
        lower, upper = max(multiple, resolution // multiple * multiple), (resolution // multiple + 1) * multiple
        raise OneOffError(f"--resolution {resolution}: this {family_name} model needs a multiple of {multiple} "
                          f"px; use {lower} or {upper}")
    cfg = train_config(opts, family)

    staged = stage_data(Path(opts.data), work, opts.prompt, opts.style)
    min_size = max(8, resolution // 2)  # at most 2x upscaling
    data_cfg = DataConfig(source="local", raw_dir=str(staged.raw_dir), styles=staged.styles, resolution=resolution,
                          min_size=min_size)
    detected = "" if opts.family else ", detected"
    own = "" if opts.resolution else " (the model's own)"
    echo(f"model {model_dir} (family {family_name}{detected}), resolution {resolution} px{own}, device {device}")
    for s in staged.styles:
        echo(f"style {s}: {staged.images[s]} image(s) in {staged.sources[s]}, {staged.prompted[s]} captioned "
             "with the prompt")
    report = ingest(staged.raw_dir, work / "ingested", data_cfg)
    for r in report.rejections:
        echo(f"  skipped {staged.user_path(r.file)}: {r.reason} ({r.detail})")
    accepted = {s: c["accepted"] for s, c in report.by_style().items()}
    for s, n in accepted.items():
        if n == 0:
            raise _unusable(staged, s, [r.reason for r in report.rejections if r.file.startswith(f"{s}/")],
                            "loading", resolution)
    n_min = min(accepted.values())
    curate_cfg = CurateConfig(
        min_resolution=min_size,
        val_fraction=0.1 if n_min >= MIN_IMAGES_FOR_VAL else 0.0,
        min_images_per_style=1,
        min_caption_words=1,
    )
    try:
        result = curate(work / "ingested", work / "curated", data_cfg, curate_cfg, validate=False)
    except CurationFailed as exc:
        result = exc.result
        for d in result.drops:
            echo(f"  curation dropped {staged.user_path(d.source)}: {d.reason} ({d.detail})")
        kept = {s: sum(1 for r in result.rows if r["style"] == s) for s in staged.styles}
        empty = next(s for s in staged.styles if kept[s] == 0)
        raise _unusable(staged, empty, [d.reason for d in result.drops if d.style == empty], "curation",
                        resolution) from None
    for d in result.drops:
        echo(f"  curation dropped {staged.user_path(d.source)}: {d.reason} ({d.detail})")
    kept = {s: sum(1 for r in result.rows if r["style"] == s) for s in staged.styles}
    val = {s: sum(1 for r in result.rows if r["style"] == s and r["split"] == "val") for s in staged.styles}
    echo("kept: " + ", ".join(f"{s} {n} ({n - val[s]} train, {val[s]} val)" for s, n in kept.items())
         + ("" if curate_cfg.val_fraction else f"; a val split is asked for from {MIN_IMAGES_FOR_VAL} images a style"))
    echo(f"training {cfg.steps} steps, rank {cfg.rank}, lr {cfg.learning_rate:g}, batch size {cfg.batch_size}"
         f"{' (probed on the first step)' if cfg.batch_size == 'auto' else ''}, checkpoints every "
         f"{cfg.checkpoint_every} steps in {work / 'checkpoints'}")

    if not opts.resume and (work / "checkpoints").exists():
        shutil.rmtree(work / "checkpoints")
    tracker, tracking_uri = _tracker(opts)
    if tracking_uri:
        echo(f"tracking in MLflow: {tracking_uri} (experiment {MLFLOW_EXPERIMENT}; `mlflow ui --backend-store-uri "
             f"{tracking_uri}`)")
    styles: dict[str, Any] = {}
    for s in staged.styles:
        summary = train_style(
            model_dir, family, work / "curated", s, cfg, out, tracker, work / "checkpoints", device,
            sample_seeds=[0], samples_dir=out / "samples", run_name=f"oneoff-{s}",
            tags={"stage": "oneoff"}, on_step=on_step, progress=progress, cache_dir=work / "cache",
        )
        exported = {}
        for layout in opts.formats:
            from stunning.lora_formats import convert_lora_file

            adapter = Path(summary["adapter"])
            exported[layout] = str(convert_lora_file(adapter, adapter.with_name(f"{s}-{layout}.safetensors"),
                                                     layout, family_name))
        styles[s] = {
            "adapter": summary["adapter"],
            "exports": exported,
            "images": kept[s],
            **{k: summary[k] for k in ("steps", "final_loss", "val_loss", "steps_per_s", "images_per_s",
                                       "peak_memory_mb", "batch_size", "batch_backoffs", "thermal_paused_s",
                                       "resumed_from_step", "seconds", "device", "mixed_precision",
                                       "mlflow_run_id")},
        }
    summary = {"model": str(model_dir), "family": family_name, "resolution": resolution, "styles": styles,
               "train": cfg.model_dump(), "mlflow_tracking_uri": tracking_uri}
    write_json(out / "summary.json", summary)
    return summary
