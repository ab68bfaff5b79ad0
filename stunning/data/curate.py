"""Curation: quality filters, a deterministic train/val split, dataset statistics.

Reads an ingest output (``manifest.jsonl`` + normalised PNGs) and keeps what is worth
training on. Filters, in order (the first that applies is the recorded reason):

1. ``low_resolution`` -- the original's shorter side is below ``curate.min_resolution``;
2. ``blurry`` -- variance of the Laplacian below ``curate.blur_threshold``;
3. ``short_caption`` -- fewer than ``curate.min_caption_words`` words;
4. ``near_duplicate`` -- perceptual-hash distance <= ``curate.near_duplicate_distance`` to
   an image of the same style that is kept.

Which near-duplicate survives is decided by content only, never by file name or listing
order: the images that passed filters 1-3 are visited best first and each is kept unless it
is within the distance of one already kept. "Best" is (a) the largest original pixel count
(``orig_width * orig_height``), then (b) the sharpest (highest blur score, rounded to 4
decimals), then (c) the lowest sha256 of the source bytes (the id when a manifest has no
sha256). The dropped image's detail names the kept one and which of (a)-(c) decided.
Exact duplicates (identical bytes) never get here: ingest keeps one copy by a rule of the
same kind (:mod:`stunning.data.ingest`).

The split hashes ``split_seed`` and the image id, so an image keeps its split when others
are added or removed; each style with at least two images gets at least one validation
image. The result is validated with the Great Expectations suite in
:mod:`stunning.data.expectations` *before* the dataset is published, so a dataset that
fails validation never replaces the previous one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

from stunning.config import CurateConfig, DataConfig
from stunning.data import DataError
from stunning.data.images import blur_score, hash_distance
from stunning.data.ingest import read_manifest
from stunning.io import atomic_dir, atomic_write_text

if TYPE_CHECKING:
    from stunning.data.expectations import ValidationReport

logger = logging.getLogger(__name__)

DROP_REASONS: tuple[str, ...] = ("low_resolution", "blurry", "short_caption", "near_duplicate")
MANIFEST_COLUMNS: list[str] = [
    "id", "style", "split", "path", "caption", "width", "height", "phash", "blur", "caption_words",
]
DROPPED_COLUMNS: list[str] = ["id", "style", "source", "reason", "detail"]
SPLITS: tuple[str, ...] = ("train", "val")


@dataclass(frozen=True)
class Drop:
    id: str
    style: str
    source: str
    reason: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "style": self.style, "source": self.source, "reason": self.reason, "detail": self.detail}


@dataclass
class CurateResult:
    """The curated manifest rows, what was dropped and why, statistics, and validation."""

    rows: list[dict[str, Any]]
    drops: list[Drop]
    stats: dict[str, Any]
    validation: ValidationReport | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and (self.validation is None or self.validation.success)


class CurationFailed(DataError):
    """The curated set is not fit for training; ``result`` still holds stats and validation."""

    def __init__(self, message: str, result: CurateResult) -> None:
        super().__init__(message)
        self.result = result


def caption_words(caption: str) -> int:
    return len(str(caption).split())


def split_key(image_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the id and the seed."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(ids: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Train/val assignment for one style's ids.

    An id goes to val when its key is below ``val_fraction``. With two or more ids and a
    val fraction above zero the result has at least one val and one train id: the lowest
    key is forced to val, the highest to train, so small styles still get validated without
    starving training. A val fraction of zero means no val split: every image trains.
    """
    keys = {i: split_key(i, seed) for i in ids}
    splits = {i: ("val" if k < val_fraction else "train") for i, k in keys.items()}
    if len(ids) >= 2 and val_fraction > 0:
        ordered = sorted(ids, key=lambda i: keys[i])
        if "val" not in splits.values():
            splits[ordered[0]] = "val"
        if "train" not in splits.values():
            splits[ordered[-1]] = "train"
    return splits


def _load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read an ingested image ({exc}); re-run the ingest stage.") from exc


def _check_records(records: list[dict[str, Any]], ingested_dir: Path, data_cfg: DataConfig) -> None:
    if not records:
        raise DataError(
            f"{ingested_dir / 'manifest.jsonl'} lists no images: every raw file was rejected. "
            "Read reports/ingest.md for the reasons."
        )
    required = {"id", "style", "path", "caption", "width", "height", "orig_width", "orig_height", "phash"}
    missing = required - set(records[0])
    if missing:
        raise DataError(f"{ingested_dir / 'manifest.jsonl'}: missing fields {sorted(missing)}; re-run ingest.")
    unknown = sorted({r["style"] for r in records} - set(data_cfg.styles))
    if unknown:
        raise DataError(
            f"{ingested_dir / 'manifest.jsonl'} has styles {unknown} that are not in data.styles "
            f"{list(data_cfg.styles)}: the ingested data is stale; re-run the ingest stage."
        )


def _quality_key(rec: dict[str, Any], blur: float) -> tuple[int, float, str]:
    """The near-duplicate rule's order (lowest is best): most original pixels, sharpest, lowest sha256."""
    pixels = int(rec["orig_width"]) * int(rec["orig_height"])
    return (-pixels, -round(blur, 4), str(rec.get("sha256") or rec["id"]))


def _why_kept(kept: tuple[dict[str, Any], float], other: tuple[dict[str, Any], float]) -> str:
    (krec, kblur), (orec, oblur) = kept, other
    kkey, okey = _quality_key(krec, kblur), _quality_key(orec, oblur)
    if kkey[0] != okey[0]:
        return (
            f"larger original ({krec['orig_width']}x{krec['orig_height']} vs "
            f"{orec['orig_width']}x{orec['orig_height']})"
        )
    if kkey[1] != okey[1]:
        return f"same original size, sharper (blur {kblur:.2f} vs {oblur:.2f})"
    return "same original size and sharpness, lower sha256"


def _filter(
    records: list[dict[str, Any]], ingested_dir: Path, cfg: CurateConfig
) -> tuple[list[dict[str, Any]], list[Drop], dict[str, Image.Image]]:
    drops: list[Drop] = []
    images: dict[str, Image.Image] = {}
    passed: list[tuple[dict[str, Any], float, int, str]] = []  # (record, blur, words, source)
    for rec in tqdm(sorted(records, key=lambda r: (r["style"], r["id"])), desc="curate", unit="img", disable=None, leave=False):
        source = str(rec.get("source", rec["path"]))

        def drop(reason: str, detail: str, rec: dict[str, Any] = rec, source: str = source) -> None:
            drops.append(Drop(rec["id"], rec["style"], source, reason, detail))

        shorter = min(int(rec["orig_width"]), int(rec["orig_height"]))
        if shorter < cfg.min_resolution:
            drop("low_resolution", f"original {rec['orig_width']}x{rec['orig_height']} < curate.min_resolution={cfg.min_resolution}")
            continue
        img = _load_rgb(ingested_dir / rec["path"])
        blur = blur_score(img)
        if blur < cfg.blur_threshold:
            drop("blurry", f"blur score {blur:.2f} < curate.blur_threshold={cfg.blur_threshold}")
            continue
        words = caption_words(rec["caption"])
        if words < cfg.min_caption_words:
            drop("short_caption", f"{words} word(s) {rec['caption']!r} < curate.min_caption_words={cfg.min_caption_words}")
            continue
        passed.append((rec, blur, words, source))
        images[rec["id"]] = img

    # near-duplicates: best first (see the module docstring), so the survivor is chosen by content
    kept: list[dict[str, Any]] = []
    kept_by_style: dict[str, list[tuple[dict[str, Any], float, str]]] = defaultdict(list)
    for rec, blur, words, source in sorted(passed, key=lambda p: (p[0]["style"], _quality_key(p[0], p[1]))):
        near = [
            (hash_distance(rec["phash"], krec["phash"]), krec["id"], krec, kblur, ksource)
            for krec, kblur, ksource in kept_by_style[rec["style"]]
        ]
        near = [n for n in near if n[0] <= cfg.near_duplicate_distance]
        if near:
            dist, other_id, krec, kblur, other_source = min(near, key=lambda n: (n[0], n[1]))
            drops.append(
                Drop(
                    rec["id"],
                    rec["style"],
                    source,
                    "near_duplicate",
                    f"perceptual-hash distance {dist} <= curate.near_duplicate_distance="
                    f"{cfg.near_duplicate_distance} to {other_id} ({other_source}), which is kept: "
                    f"{_why_kept((krec, kblur), (rec, blur))}",
                )
            )
            del images[rec["id"]]
            continue
        kept_by_style[rec["style"]].append((rec, blur, source))
        kept.append({**rec, "blur": round(blur, 4), "caption_words": words})
    kept.sort(key=lambda r: (r["style"], r["id"]))
    return kept, drops, images


def _stats(
    records: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    drops: list[Drop],
    images: dict[str, Image.Image],
    styles: list[str],
) -> dict[str, Any]:
    """Flat-ish numbers for ``reports/curate.json`` (DVC metrics)."""

    def r4(x: float) -> float:
        return round(float(x), 4)

    words = [r["caption_words"] for r in rows]
    by_style: dict[str, Any] = {}
    for style in styles:
        srows = [r for r in rows if r["style"] == style]
        entry: dict[str, Any] = {
            "ingested": sum(1 for r in records if r["style"] == style),
            "train": sum(1 for r in srows if r["split"] == "train"),
            "val": sum(1 for r in srows if r["split"] == "val"),
            "dropped": sum(1 for d in drops if d.style == style),
        }
        if srows:
            pixels = np.stack([np.asarray(images[r["id"]], dtype=np.float64).reshape(-1, 3).mean(0) for r in srows])
            mean_rgb = pixels.mean(0)
            entry.update(
                mean_blur=r4(np.mean([r["blur"] for r in srows])),
                caption_words_mean=r4(np.mean([r["caption_words"] for r in srows])),
                mean_r=r4(mean_rgb[0]),
                mean_g=r4(mean_rgb[1]),
                mean_b=r4(mean_rgb[2]),
            )
        by_style[style] = entry
    reasons = Counter(d.reason for d in drops)
    return {
        "ingested": len(records),
        "kept": len(rows),
        "dropped": len(drops),
        "train": sum(1 for r in rows if r["split"] == "train"),
        "val": sum(1 for r in rows if r["split"] == "val"),
        "dropped_by_reason": {reason: reasons.get(reason, 0) for reason in DROP_REASONS},
        "mean_blur": r4(np.mean([r["blur"] for r in rows])) if rows else 0.0,
        "caption_words_min": min(words) if words else 0,
        "caption_words_max": max(words) if words else 0,
        "caption_words_mean": r4(np.mean(words)) if words else 0.0,
        "by_style": by_style,
        # a list: `dvc metrics` skips it, people reading the file get every drop and why
        "drops": [d.to_dict() for d in drops],
    }


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def curate(
    ingested_dir: Path,
    out_dir: Path,
    data_cfg: DataConfig,
    cfg: CurateConfig,
    *,
    validate: bool = True,
) -> CurateResult:
    """Filter, split and validate the ingested set, then publish it to ``out_dir``.

    Raises :class:`CurationFailed` (nothing published, ``result`` attached) when a style
    has fewer than ``curate.min_images_per_style`` training images or, with
    ``validate=True``, when the Great Expectations suite fails.
    """
    ingested_dir, out_dir = Path(ingested_dir), Path(out_dir)
    records = read_manifest(ingested_dir)
    _check_records(records, ingested_dir, data_cfg)
    kept, drops, images = _filter(records, ingested_dir, cfg)

    rows: list[dict[str, Any]] = []
    for style in data_cfg.styles:
        skept = [r for r in kept if r["style"] == style]
        splits = assign_splits([r["id"] for r in skept], cfg.val_fraction, cfg.split_seed)
        for rec in skept:
            split = splits[rec["id"]]
            rows.append({**rec, "split": split, "path": f"{split}/{style}/{rec['id']}.png"})
    rows.sort(key=lambda r: (r["style"], r["split"], r["id"]))
    stats = _stats(records, rows, drops, images, list(data_cfg.styles))
    result = CurateResult(rows=rows, drops=drops, stats=stats)

    if validate:
        from stunning.data.expectations import validate_manifest

        result.validation = validate_manifest(manifest_frame(rows), data_cfg, cfg)

    short = {s: v["train"] for s, v in stats["by_style"].items() if v["train"] < cfg.min_images_per_style}
    if short:
        result.problems.append(
            "too few training images after curation: "
            + ", ".join(f"{s}: {n}" for s, n in short.items())
            + f" (curate.min_images_per_style={cfg.min_images_per_style}). Add photos to those style "
            "folders, relax the filters (`drops` in the curation stats lists every dropped image "
            "and why), or lower curate.min_images_per_style."
        )
    if result.validation is not None and not result.validation.success:
        result.problems.append(result.validation.failure_text())
    if result.problems:
        raise CurationFailed("\n".join(result.problems), result)

    ingested_paths = {r["id"]: r["path"] for r in records}
    with atomic_dir(out_dir) as tmp:
        for row in rows:
            target = tmp / row["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ingested_dir / ingested_paths[row["id"]], target)
            atomic_write_text(target.with_suffix(".txt"), row["caption"] + "\n")
        atomic_write_text(tmp / "manifest.csv", _csv(rows, MANIFEST_COLUMNS))
        atomic_write_text(tmp / "dropped.csv", _csv([d.to_dict() for d in drops], DROPPED_COLUMNS))
        atomic_write_text(
            tmp / "curate_config.yaml",
            yaml.safe_dump(
                {"data": _data_keys(data_cfg), "curate": cfg.model_dump()},
                sort_keys=False,
            ),
        )
    logger.info(
        "curate: %d kept (%d train, %d val), %d dropped -> %s",
        stats["kept"], stats["train"], stats["val"], stats["dropped"], out_dir,
    )
    return result


def _data_keys(data_cfg: DataConfig) -> dict[str, Any]:
    """The data settings recorded with a curated set; the bucket keys only with data.buckets on
    (the trainer accepts images of several sizes only from a set recorded as bucketed)."""
    keys = {"styles", "resolution"} | ({"buckets", "bucket_step", "bucket_max_ratio"} if data_cfg.buckets else set())
    return data_cfg.model_dump(include=keys)


def manifest_frame(rows: list[dict[str, Any]]) -> Any:
    """The curated manifest as a pandas DataFrame with exactly the manifest columns."""
    import pandas as pd

    return pd.DataFrame([{c: r.get(c) for c in MANIFEST_COLUMNS} for r in rows], columns=MANIFEST_COLUMNS)


def read_curated_manifest(curated_dir: Path) -> Any:
    """Read ``manifest.csv`` of a curated set as a DataFrame (ids and hashes stay strings)."""
    import pandas as pd

    path = Path(curated_dir) / "manifest.csv"
    if not path.is_file():
        raise DataError(f"{path} not found: run the curate stage first (`dvc repro curate`).")
    return pd.read_csv(path, dtype={"id": str, "phash": str, "caption": str}, keep_default_na=False)
