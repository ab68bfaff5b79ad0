"""Validation: every model variant on fixed prompts and seeds, measured the same way.

Variants, in order: the ``base``; each style adapter on the base (``adapter-<style>``,
loaded with stock ``load_lora_weights`` and unloaded after); each blend
(``blend-<name>``); the ``fused`` pipeline; and its denoiser at the quantization level the
merge stage chose (``quantized``). Each
generates one image per (prompt, seed) pair. The first :data:`LATENCY_IMAGES` are drawn one
request at a time, so ``latency_s`` is what a user waits per image (after one untimed
warm-up call that pays one-off costs), and ``peak_memory_mb`` is
:class:`stunning.device.PeakMemory` around them (device memory on CUDA/MPS, the process RSS
on CPU — which includes the loaded weights). The rest, and the style sets below, are drawn in
small batches (:func:`style_set_batch`), untimed: each image keeps its own seeded generator,
so a batch draws the same images up to float summation order (measured on the micro model:
6 of 8 images bit-identical, the others one level apart in a few pixel values).

Per variant: the style distance (:mod:`stunning.metrics`) of its fixed-prompt images to
each style's reference set — the curated train + val images of that style — and to the
base's outputs, plus the paired pixel MSE to the base.

Per adapter, the **style gain** is measured *content-matched*: for each reference image of
the style (up to ``validate.style_set_size``) the base draws its caption without the style
phrase (:func:`plain_prompt`) and the adapter draws it as it was trained (the caption
itself), one seed each; both sets are compared with those references, so
``style_gain = 1 − d(adapter, own)/d(base, own)`` measures style and not how far the fixed
prompts' scenes (backgrounds, garments) are from the references' scenes — as FID-style
evaluations draw the captions of the reference set. ``style_residual`` names the features
that make up most of what is left of the adapter's distance. ``style_margin`` (fixed
prompts) = mean distance to the other styles minus distance to its own (positive: closer
to its own style than to the others). ``reference_floor`` is the distance between a
style's train and val images: the distance a perfect model of the style would still have.

Per adapter, ``eval_loss`` is a quality signal that works on any user's photos: the
trainer's fixed-noise denoising objective (:func:`stunning.training.evaluation.evaluate_loss`)
on the style's held-out val images (``data/curated`` split ``val``), encoded as the trainer
encodes them, with the same timesteps and noise for the base, the adapter and the champion's
adapter (when ``reports/champion.json`` names one): ``{"base", "adapter", "gain": 1 − adapter/base,
"gain_std"`` (spread over :data:`EVAL_REPEATS` noise draws, from which a gate derives a noise
band), ``"champion", "champion_gain"...}``; a style without val images is reported
``{"measured": false, "reason": ...}``.

Images go to ``<out>/<variant>/``, the content-matched sets to
``<out>/style-sets/<style>-{base,adapter}/``, and a labelled contact sheet to
``<out>/grid.png``.
"""

from __future__ import annotations

import csv
import gc
import logging
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stunning import metrics
from stunning.clip_scores import clip_report
from stunning.io import atomic_dir

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
REFERENCE_SPLITS = ("train", "val")


class ValidationInputError(ValueError):
    """An input the validation needs is missing or malformed; the message says what to do."""


@dataclass
class VariantResult:
    name: str
    kind: str  # base | adapter | blend | fused | quantized
    source: str
    images: list[Image.Image]
    latencies_s: list[float]
    peak_memory_mb: float
    memory_delta_mb: float
    prompts: list[str] = field(default_factory=list)  # the prompt of each image, in order
    style_distance: dict[str, float] = field(default_factory=dict)
    distance_to_base: float = 0.0
    pixel_mse_to_base: float = 0.0
    blank_images: int = 0
    adherence: dict[str, float] = field(default_factory=dict)  # oracle accuracy per attribute

    @property
    def latency_s(self) -> float:
        return float(np.mean(self.latencies_s)) if self.latencies_s else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "style_distance": {k: round(v, 6) for k, v in self.style_distance.items()},
            "distance_to_base": round(self.distance_to_base, 6),
            "pixel_mse_to_base": round(self.pixel_mse_to_base, 6),
            "latency_s": round(self.latency_s, 4),
            "latency_max_s": round(max(self.latencies_s), 4) if self.latencies_s else None,
            "peak_memory_mb": round(self.peak_memory_mb, 2),
            "memory_delta_mb": round(self.memory_delta_mb, 2),
            "images": len(self.images),
            "blank_images": self.blank_images,
            "adherence": {k: round(v, 4) for k, v in self.adherence.items()},
        }


@dataclass
class ValidationResult:
    prompts: list[str]
    seeds: list[int]
    variants: dict[str, VariantResult]
    style_gain: dict[str, float]
    style_margin: dict[str, float]
    adapters: dict[str, dict[str, float]]
    reference_images: dict[str, int]
    reference_floor: dict[str, float]
    device: str
    seconds: float = 0.0
    # Prompt adherence (embedded world only): per style, the attributes the style keeps
    # readable and the adapter's drop in adherence on them relative to the base.
    adherence_drop: dict[str, float] = field(default_factory=dict)
    readable_attributes: dict[str, list[str]] = field(default_factory=dict)
    # Per style: the largest per-feature terms of the adapter's content-matched distance.
    style_residual: dict[str, dict[str, float]] = field(default_factory=dict)
    style_set_images: dict[str, int] = field(default_factory=dict)
    # Per style: held-out denoising loss of base / adapter / champion (see the module doc).
    eval_loss: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Optional CLIP scores (stunning/clip_scores.py): {"measured": bool, "model", "styles"|"reason"}.
    clip: dict[str, Any] = field(default_factory=lambda: {"measured": False, "reason": "not computed"})

    def to_dict(self) -> dict[str, Any]:
        """The ``reports/validation.json`` body (numbers only, so `dvc metrics` can diff it)."""
        return {
            "variants": {n: v.to_dict() for n, v in self.variants.items()},
            "style_gain": {k: round(v, 6) for k, v in self.style_gain.items()},
            "style_margin": {k: round(v, 6) for k, v in self.style_margin.items()},
            "adapters": {s: {k: round(x, 6) for k, x in d.items()} for s, d in self.adapters.items()},
            "reference_images": dict(self.reference_images),
            "reference_floor": {k: round(v, 6) for k, v in self.reference_floor.items()},
            "adherence_drop": {k: round(v, 4) for k, v in self.adherence_drop.items()},
            "readable_attributes": dict(self.readable_attributes),
            "style_residual": {s: {k: round(x, 6) for k, x in d.items()} for s, d in self.style_residual.items()},
            "style_set_images": dict(self.style_set_images),
            "eval_loss": {s: dict(d) for s, d in self.eval_loss.items()},
            "clip": dict(self.clip),
            "images_per_variant": len(self.prompts) * len(self.seeds),
            "seconds": round(self.seconds, 2),
        }


# --------------------------------------------------------------------------- references


def load_references(data_dir: str | Path, styles: list[str], splits: tuple[str, ...] = REFERENCE_SPLITS) -> dict[str, dict[str, list[Path]]]:
    """Reference image paths per style and split, from ``<data_dir>/manifest.csv``."""
    data_dir = Path(data_dir)
    manifest = data_dir / MANIFEST
    if not manifest.is_file():
        raise ValidationInputError(f"{manifest} not found: run the curate stage (`dvc repro curate`) first.")
    refs: dict[str, dict[str, list[Path]]] = {s: {} for s in styles}
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing_cols = {"style", "split", "path"} - set(reader.fieldnames or [])
        if missing_cols:
            raise ValidationInputError(f"{manifest}: missing column(s) {sorted(missing_cols)}; re-run the curate stage.")
        for line, row in enumerate(reader, start=2):
            if row["style"] not in refs or row["split"] not in splits:
                continue
            path = data_dir / row["path"]
            if not path.is_file():
                raise ValidationInputError(f"{manifest}:{line}: image {path} does not exist; re-run the curate stage.")
            refs[row["style"]].setdefault(row["split"], []).append(path)
    empty = [s for s, by_split in refs.items() if not any(by_split.values())]
    if empty:
        raise ValidationInputError(
            f"{manifest}: no {'/'.join(splits)} images for style(s) {empty}; every style in data.styles needs curated images."
        )
    return refs


# --------------------------------------------------------------------------- generation


def _generate_variant(
    family: Any,
    pipe: Any,
    name: str,
    kind: str,
    source: str,
    pairs: list[tuple[str, int]],
    steps: int,
    guidance_scale: float,
    device: Any,
) -> VariantResult:
    from stunning.device import PeakMemory

    # One untimed single-step call: lazy initialisation (kernels, caches) is not latency.
    family.generate(pipe, [pairs[0][0]], [pairs[0][1]], 1, guidance_scale)
    images: list[Image.Image] = []
    latencies: list[float] = []
    # Latency and peak memory are those of one request for one image, measured on the first
    # LATENCY_IMAGES pairs; the rest are drawn in batches (same pixels up to float summation
    # order: every image keeps its own seeded generator), outside the measurement.
    timed, rest = pairs[:LATENCY_IMAGES], pairs[LATENCY_IMAGES:]
    with PeakMemory(device) as pm:
        for prompt, seed in timed:
            t0 = time.perf_counter()
            images.extend(family.generate(pipe, [prompt], [seed], steps, guidance_scale))
            latencies.append(time.perf_counter() - t0)
    n = style_set_batch(family.resolution(pipe))
    for i in range(0, len(rest), n):
        chunk = rest[i:i + n]
        images.extend(family.generate(pipe, [p for p, _ in chunk], [sd for _, sd in chunk], steps, guidance_scale))
    log.info("%s: %d images, %.3f s/image, peak %.0f MB", name, len(images), float(np.mean(latencies)), pm.peak_mb)
    return VariantResult(name, kind, source, images, latencies, pm.peak_mb, pm.delta_mb)


LATENCY_IMAGES = 4  # images per variant generated one request at a time, timed (latency, peak memory)

# Pixels drawn per batch for the style sets and the untimed images: 8 images at 256 px (and below), 2 at 512, 1 at
# 1024 — a batch never needs more activation memory than one 724 px image.
STYLE_SET_PIXELS = 8 * 256 * 256


def style_set_batch(resolution: int) -> int:
    """How many style-set images one `generate` call draws at `resolution` px (1..8)."""
    return max(1, min(8, STYLE_SET_PIXELS // max(1, int(resolution)) ** 2))


def _release_memory() -> None:
    """Return freed pipeline memory before the next variant loads (its peak must not include it)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def _to_array(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 for im in images])


def validate(
    params: Any,
    base_path: str | Path,
    adapters_dir: str | Path,
    merged_dir: str | Path | None,
    data_dir: str | Path,
    out_dir: str | Path,
    device: Any = None,
    progress: Callable[[str], None] | None = None,
    champion_adapters: str | Path | None = None,
) -> ValidationResult:
    """Generate every variant, measure it, and publish images + grid to ``out_dir`` atomically.

    `champion_adapters`: the `@champion`'s adapters folder (from ``reports/champion.json``),
    whose eval loss is measured on the same val images and noise as the candidate's."""
    import torch

    from stunning.blend import LORA_FILE
    from stunning.device import default_dtype, select_device
    from stunning.families import get_family

    t_start = time.perf_counter()
    cfg = params.validate_
    styles = list(params.data.styles)
    family = get_family(params.base.family)
    device = select_device(device) if not isinstance(device, torch.device) else device
    dtype = default_dtype(device)
    pairs = [(p, int(s)) for p in cfg.prompts for s in cfg.seeds]
    if not pairs:
        raise ValidationInputError("validate.prompts and validate.seeds must both be non-empty.")

    adapters_dir = Path(adapters_dir)
    adapter_dirs = {s: adapters_dir / s for s in styles}
    missing = [str(d / LORA_FILE) for d in adapter_dirs.values() if not (d / LORA_FILE).is_file()]
    if missing:
        raise ValidationInputError(f"adapter weights not found: {missing}. Run the train stage (`dvc repro train`).")
    merged = Path(merged_dir) if merged_dir is not None else None
    blend_dirs: dict[str, Path] = {}
    if merged is not None:
        for b in params.merge.blends:
            d = merged / "blends" / b.name
            if not (d / LORA_FILE).is_file():
                raise ValidationInputError(f"blend {b.name!r} not found at {d / LORA_FILE}: run the merge stage.")
            blend_dirs[b.name] = d
        for d in (merged / "fused" / "model_index.json", merged / "quantized" / "quantized.json"):
            if not d.is_file():
                raise ValidationInputError(f"{d} not found: run the merge stage (`dvc repro merge`).")

    refs = load_references(data_dir, styles)
    ref_feats = {s: metrics.features([p for ps in by.values() for p in ps]) for s, by in refs.items()}
    floor = {}
    for s, by in refs.items():
        if by.get("train") and by.get("val"):
            floor[s] = metrics.set_distance(metrics.features(by["train"]), metrics.features(by["val"]))

    say = progress or (lambda msg: None)
    variants: dict[str, VariantResult] = {}

    def run(pipe, name, kind, source, style=None):
        say(name)
        if cfg.sampler != "default":
            if not family.samplers:
                raise ValidationInputError(
                    f"validate.sampler={cfg.sampler!r}: the {family.name} family has no sampler choice; use default."
                )
            try:
                family.set_sampler(pipe, cfg.sampler)
            except ValueError as exc:
                raise ValidationInputError(f"validate.sampler: {exc}") from None
        # An adapter is prompted the way its captions were written (validate.adapter_prompt).
        run_pairs = pairs if style is None else [(adapter_prompt(cfg, p, style), s) for p, s in pairs]
        variants[name] = _generate_variant(
            family, pipe, name, kind, source, run_pairs, cfg.steps, cfg.guidance_scale, device
        )
        variants[name].prompts = [p for p, _ in run_pairs]

    sets = style_sets(cfg, data_dir, styles)

    def draw(pipe, prompts, seeds):
        # The style sets are drawn in batches (each image keeps its own seeded generator, so a
        # batch draws what single calls draw up to float summation order): latency is measured
        # on the fixed prompts above, one image at a time, not here.
        n = style_set_batch(family.resolution(pipe))
        return [im for i in range(0, len(prompts), n)
                for im in family.generate(pipe, prompts[i:i + n], seeds[i:i + n], cfg.steps, cfg.guidance_scale)]

    pipe = family.load_pipeline(Path(base_path), device, dtype)
    say("eval loss")
    losses = eval_losses(
        family, pipe, data_dir, styles, adapter_dirs, seed=int(params.base.seed),
        train_cfg=params.train, champion_adapters=champion_adapters,
    )
    run(pipe, "base", "base", str(base_path))
    for style, st in sets.items():
        say(f"base, {style} style set")
        st.base_images = draw(pipe, st.base_prompts, st.seeds)
    for style, d in adapter_dirs.items():
        pipe.load_lora_weights(str(d), adapter_name=f"val_{style}")
        run(pipe, f"adapter-{style}", "adapter", str(d), style=style)
        say(f"adapter-{style}, style set")
        sets[style].adapter_images = draw(pipe, sets[style].adapter_prompts, sets[style].seeds)
        pipe.unload_lora_weights()
    for name, d in blend_dirs.items():
        pipe.load_lora_weights(str(d), adapter_name=f"val_blend_{name}")
        run(pipe, f"blend-{name}", "blend", str(d))
        pipe.unload_lora_weights()
    pipe = None
    _release_memory()
    if merged is not None:
        from stunning.quantize import load_quantized

        pipe = family.load_pipeline(merged / "fused", device, dtype)
        run(pipe, "fused", "fused", str(merged / "fused"))
        pipe = None
        _release_memory()
        pipe = load_quantized(merged / "fused", merged / "quantized", device)
        run(pipe, "quantized", "quantized", str(merged / "quantized"))
        pipe = None
        _release_memory()

    base_feats = metrics.features(variants["base"].images)
    base_px = _to_array(variants["base"].images)
    for v in variants.values():
        feats = metrics.features(v.images)
        v.style_distance = {s: metrics.set_distance(feats, f) for s, f in ref_feats.items()}
        v.distance_to_base = metrics.set_distance(feats, base_feats)
        v.pixel_mse_to_base = float(((_to_array(v.images) - base_px) ** 2).mean())
        v.blank_images = sum(metrics.is_blank(im) for im in v.images)

    drops, readable = _adherence(variants, pairs, styles, data_dir)

    gains: dict[str, float] = {}
    margins: dict[str, float] = {}
    residual: dict[str, dict[str, float]] = {}
    adapters: dict[str, dict[str, float]] = {}
    base_v = variants["base"]
    for style in styles:
        v, st = variants[f"adapter-{style}"], sets[style]
        st_refs = metrics.features(st.references)
        own = metrics.set_distance(metrics.features(st.adapter_images), st_refs)
        base_own = metrics.set_distance(metrics.features(st.base_images), st_refs)
        gains[style] = metrics.style_gain(own, base_own)
        terms = metrics.feature_contributions(metrics.features(st.adapter_images), st_refs)
        residual[style] = dict(sorted(terms.items(), key=lambda kv: -kv[1])[:3])
        others = [v.style_distance[o] for o in styles if o != style]
        info = {
            "own_distance": own,
            "base_distance": base_own,
            "fixed_prompts_own_distance": v.style_distance[style],
            "fixed_prompts_base_distance": base_v.style_distance[style],
        }
        if others:
            margins[style] = float(np.mean(others)) - own
            info["other_distance"] = float(np.mean(others))
        adapters[style] = info

    say("clip scores" if cfg.clip_model else "clip scores: off")
    clip = clip_report(cfg.clip_model, {
        style: {"base_images": st.base_images, "adapter_images": st.adapter_images,
                "base_prompts": st.base_prompts, "references": [Image.open(p).convert("RGB") for p in st.references]}
        for style, st in sets.items()
    } if cfg.clip_model else {})

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for v in variants.values():
            folder = tmp / v.name
            folder.mkdir()
            for i, ((_, seed), im) in enumerate(zip(pairs, v.images, strict=True)):
                im.save(folder / f"{i:02d}_p{i // len(cfg.seeds)}_s{seed}.png")
        for style, st in sets.items():
            for kind, images in (("base", st.base_images), ("adapter", st.adapter_images)):
                folder = tmp / "style-sets" / f"{style}-{kind}"
                folder.mkdir(parents=True)
                for i, im in enumerate(images):
                    im.save(folder / f"{i:02d}_s{st.seeds[i]}.png")
        make_grid(variants, pairs).save(tmp / "grid.png")

    return ValidationResult(
        prompts=list(cfg.prompts),
        seeds=[int(s) for s in cfg.seeds],
        variants=variants,
        style_gain=gains,
        style_margin=margins,
        adapters=adapters,
        reference_images={s: sum(len(p) for p in by.values()) for s, by in refs.items()},
        reference_floor=floor,
        device=str(device),
        seconds=time.perf_counter() - t_start,
        adherence_drop=drops,
        readable_attributes=readable,
        style_residual=residual,
        style_set_images={s: len(st.references) for s, st in sets.items()},
        eval_loss=losses,
        clip=clip,
    )


# --------------------------------------------------------------------------- held-out loss

EVAL_REPEATS = 4  # noise draws per model: the spread between them is the measurement noise
EVAL_BATCH = 8


def eval_losses(
    family: Any,
    pipe: Any,
    data_dir: str | Path,
    styles: list[str],
    adapter_dirs: dict[str, Path],
    *,
    seed: int = 0,
    train_cfg: Any = None,
    champion_adapters: str | Path | None = None,
    repeats: int = EVAL_REPEATS,
) -> dict[str, dict[str, Any]]:
    """Per style: the held-out denoising loss of the base, the style's adapter and (if given)
    the champion's adapter of that style, on the style's val images with fixed noise.

    Reuses the trainer's encoding (:func:`~stunning.training.encoding.encode_buckets`, with its
    DreamBooth caption mapping from `train_cfg`) and objective
    (:func:`~stunning.training.evaluation.evaluate_loss`): every model sees the same latents,
    timesteps and noise per repeat, so differences are the models'. Repeat `r` draws with seed
    ``seed + 1000 r``; ``*_std`` are the standard deviations over the repeats.
    """
    from stunning.blend import LORA_FILE
    from stunning.training.dataset import CuratedDataset
    from stunning.training.dreambooth import instance_caption_fn
    from stunning.training.encoding import encode_buckets
    from stunning.training.evaluation import evaluate_loss

    captions = instance_caption_fn(train_cfg) if train_cfg is not None else None
    scheduler = family.noise_scheduler(pipe)
    report: dict[str, dict[str, Any]] = {}
    encoded: dict[str, list] = {}
    for style in styles:
        val = CuratedDataset(data_dir, style, "val", allow_empty=True)
        if not len(val):
            report[style] = {"measured": False, "reason": f"no val images of {style!r} in {data_dir} (curate.val_fraction)"}
            continue
        encoded[style] = encode_buckets(family, pipe, val, seed, caption_fn=captions)
        report[style] = {"measured": True, "val_images": len(val), "repeats": repeats}

    def per_repeat(buckets) -> list[float]:
        total = sum(lat.shape[0] for lat, _ in buckets)
        return [
            sum(
                evaluate_loss(family, pipe, scheduler, lat, cond, seed + 1000 * r + i, EVAL_BATCH, repeats=1)
                * lat.shape[0] / total
                for i, (lat, cond) in enumerate(buckets)
            )
            for r in range(repeats)
        ]

    def with_adapter(folder: Path, name: str, buckets) -> list[float]:
        pipe.load_lora_weights(str(folder), adapter_name=name)
        try:
            return per_repeat(buckets)
        finally:
            pipe.unload_lora_weights()

    champion_dir = Path(champion_adapters) if champion_adapters else None
    for style, buckets in encoded.items():
        base = per_repeat(buckets)
        entry = report[style]
        entry.update(_loss_stats("base", base))
        entry.update(_loss_stats("adapter", with_adapter(adapter_dirs[style], f"eval_{style}", buckets), base))
        if champion_dir is not None and (champion_dir / style / LORA_FILE).is_file():
            champ = with_adapter(champion_dir / style, f"eval_champion_{style}", buckets)
            entry.update(_loss_stats("champion", champ, base))
        log.info("%s: eval loss base %.5f, adapter %.5f (gain %+.4f ± %.4f)", style, entry["base"],
                 entry["adapter"], entry["gain"], entry["gain_std"])
    return report


def _loss_stats(name: str, losses: list[float], base: list[float] | None = None) -> dict[str, float]:
    """Mean and std of `losses`; with `base` also the gain 1 − loss/base (mean ratio and the
    std of the per-repeat gains)."""
    arr = np.asarray(losses, dtype=np.float64)
    out = {name: round(float(arr.mean()), 8), f"{name}_std": round(float(arr.std()), 8)}
    if base is not None:
        b = np.asarray(base, dtype=np.float64)
        gains = 1.0 - arr / b
        key = "gain" if name == "adapter" else f"{name}_gain"
        out[key] = round(float(1.0 - arr.mean() / b.mean()), 8)
        out[f"{key}_std"] = round(float(gains.std()), 8)
    return out


def adapter_prompt(cfg: Any, prompt: str, style: str) -> str:
    """The prompt an adapter of `style` is validated with (``validate.adapter_prompt``)."""
    return cfg.adapter_prompt.format(prompt=prompt, style=style)


def plain_prompt(cfg: Any, caption: str, style: str) -> str:
    """`caption` without the style phrase that ``validate.adapter_prompt`` adds (its inverse).

    "a red dress, noir style" -> "a red dress" with the default template; a caption that
    does not follow the template is returned as it is.
    """
    marker = "\x00"
    prefix, found, suffix = cfg.adapter_prompt.format(prompt=marker, style=style).partition(marker)
    if found and len(caption) > len(prefix) + len(suffix) and caption.startswith(prefix) and caption.endswith(suffix):
        return caption[len(prefix) : len(caption) - len(suffix)]
    return caption


@dataclass
class StyleSet:
    """The content-matched comparison set of one style (see the module docstring)."""

    references: list[Path]
    base_prompts: list[str]
    adapter_prompts: list[str]
    seeds: list[int]
    base_images: list[Image.Image] = field(default_factory=list)
    adapter_images: list[Image.Image] = field(default_factory=list)


def style_sets(cfg: Any, data_dir: str | Path, styles: list[str]) -> dict[str, StyleSet]:
    """Per style: the first ``validate.style_set_size`` train/val references with captions."""
    data_dir = Path(data_dir)
    sets = {s: StyleSet([], [], [], []) for s in styles}
    with (data_dir / MANIFEST).open(newline="") as fh:
        for row in csv.DictReader(fh):
            st = sets.get(row["style"])
            caption = (row.get("caption") or "").strip()
            if st is None or row.get("split") not in REFERENCE_SPLITS or not caption:
                continue
            if len(st.references) >= cfg.style_set_size:
                continue
            plain = plain_prompt(cfg, caption, row["style"])
            st.references.append(data_dir / row["path"])
            st.base_prompts.append(plain)
            st.adapter_prompts.append(adapter_prompt(cfg, plain, row["style"]))
            st.seeds.append(int(cfg.seeds[len(st.seeds) % len(cfg.seeds)]))
    empty = [s for s, st in sets.items() if not st.references]
    if empty:
        raise ValidationInputError(
            f"{data_dir / MANIFEST}: no captioned train/val images for style(s) {empty}; the content-matched "
            "style distance draws the references' captions. Give every image a caption and re-run curate."
        )
    return sets


# --------------------------------------------------------------------------- adherence

READABLE_ACCURACY = 0.8  # an attribute counts for a style if the oracle reads it this well on the style's data


def _adherence(
    variants: dict[str, VariantResult], pairs: list[tuple[str, int]], styles: list[str], data_dir: str | Path
) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Prompt adherence by the analytic oracle, when the prompts are in the embedded world's grammar.

    Fills ``VariantResult.adherence`` for every variant and returns, per style, the
    adapter's adherence drop vs the base and the attributes it is measured on: those the
    oracle still reads (accuracy >= ``READABLE_ACCURACY``) on the style's own curated images
    — colour survives an impressionist style but not a monochrome one, and an adapter must
    not be blamed for what its style removes. For prompts outside the grammar (a user's own
    world) adherence is not measurable and nothing is returned.
    """
    from stunning.data import oracle

    try:
        for v in variants.values():
            for p in set(v.prompts or [p for p, _ in pairs]):
                oracle.parse_caption(p)
    except ValueError:
        log.info("validation prompts are not in the embedded world's grammar: adherence not measured")
        return {}, {}
    for v in variants.values():
        prompts = v.prompts or [p for p, _ in pairs]
        v.adherence = {k: float(x) for k, x in oracle.adherence(v.images, prompts).items() if k != "n"}
    attributes = [k for k in variants["base"].adherence]
    drops: dict[str, float] = {}
    readable: dict[str, list[str]] = {}
    for style in styles:
        ref_images, ref_captions = _references_with_captions(data_dir, style)
        try:
            ref_acc = oracle.adherence(ref_images, ref_captions)
        except ValueError:  # the style's captions are not in the grammar
            continue
        keep = [a for a in attributes if ref_acc.get(a, 0.0) >= READABLE_ACCURACY]
        readable[style] = keep
        name = f"adapter-{style}"
        if keep and name in variants:
            base = float(np.mean([variants["base"].adherence[a] for a in keep]))
            mine = float(np.mean([variants[name].adherence[a] for a in keep]))
            drops[style] = base - mine
    return drops, readable


def _references_with_captions(data_dir: str | Path, style: str) -> tuple[list[Image.Image], list[str]]:
    data_dir = Path(data_dir)
    images, captions = [], []
    with (data_dir / MANIFEST).open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["style"] == style and row.get("caption"):
                with Image.open(data_dir / row["path"]) as im:
                    images.append(im.convert("RGB"))
                captions.append(row["caption"])
    return images, captions


# --------------------------------------------------------------------------- grid


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to a pixel width (the last line is cut with an ellipsis)."""
    for chars in range(max(4, len(text)), 3, -1):
        lines = textwrap.wrap(text, chars)
        if all(draw.textlength(line, font=font) <= width for line in lines):
            break
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(1, len(lines[-1]) - 1)] + "…"
    return lines


def make_grid(variants: dict[str, VariantResult], pairs: list[tuple[str, int]], cell: int = 96) -> Image.Image:
    """Rows = variants, columns = (prompt, seed); labelled, images upscaled without smoothing."""
    font, small = _font(12), _font(10)
    header_h, pad = 58, 4
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 12 + int(max([measure.textlength(n, font=font) for n in variants] + [100]))
    cols, rows = len(pairs), len(variants)
    grid = Image.new("RGB", (label_w + cols * (cell + pad) + pad, header_h + rows * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for c, (prompt, seed) in enumerate(pairs):
        x = label_w + pad + c * (cell + pad)
        lines = _wrap(draw, prompt, small, cell, 3) + [f"seed {seed}"]
        for i, line in enumerate(lines):
            draw.text((x, 4 + i * 13), line, fill="black", font=small)
    for r, v in enumerate(variants.values()):
        y = header_h + pad + r * (cell + pad)
        draw.text((6, y + 4), v.name, fill="black", font=font)
        draw.text((6, y + 22), f"{v.latency_s:.2f} s/img", fill="dimgray", font=small)
        if v.style_distance:
            nearest = min(v.style_distance, key=v.style_distance.get)
            draw.text((6, y + 36), f"nearest: {nearest}", fill="dimgray", font=small)
        for c, im in enumerate(v.images):
            x = label_w + pad + c * (cell + pad)
            resample = Image.Resampling.NEAREST if im.width <= cell else Image.Resampling.LANCZOS
            grid.paste(im.convert("RGB").resize((cell, cell), resample), (x, y))
    return grid
