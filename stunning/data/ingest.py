"""Ingest: raw style folders -> normalised PNGs, a manifest, and a rejection report.

Images are centre-cropped to ``data.resolution`` squares, or with ``data.buckets`` fitted to
the aspect-ratio bucket nearest their own aspect (``stunning.data.images.bucket_sizes``:
cover the bucket, then centre-crop); the manifest records each image's width and height.

Input layout: ``<raw_dir>/<style>/`` per style in ``data.styles``, each image with a
caption from a same-name ``.txt`` sidecar or from a ``metadata.jsonl`` in its folder
(Hugging Face imagefolder convention: ``{"file_name": "x.png", "text": "..."}``; the
sidecar wins when both exist). Every file is accounted for: accepted images land in
``images/<style>/<id>.png`` (``id`` = first 16 hex digits of the sha256 of the source
bytes, so it is stable across runs and machines) and in ``manifest.jsonl``; every other
file is listed in the report with a reason and what to do. Captions, ``metadata.jsonl``
and ``README.md`` files are consumed, not rejected. The output folder is built aside
and published in one rename.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from stunning.config import DataConfig
from stunning.data import DataError
from stunning.data.images import (
    REMEDIES,
    ImageRejected,
    bucket_resize,
    bucket_sizes,
    check_extension,
    check_size,
    decode_image,
    perceptual_hash,
    square_resize,
)
from stunning.io import atomic_dir, atomic_write_bytes, atomic_write_text, write_json

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
MANIFEST_FILE = "manifest.jsonl"
_CONSUMED_NAMES = {METADATA_FILE, "readme.md"}


@dataclass(frozen=True)
class Rejection:
    file: str  # relative to raw_dir
    reason: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"file": self.file, "reason": self.reason, "detail": self.detail}


@dataclass
class IngestReport:
    """What ingest did with every file; ``to_dict`` is the ``reports/ingest.json`` format."""

    raw_dir: str
    styles: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    warnings: list[Rejection] = field(default_factory=list)  # e.g. captions nobody uses

    @property
    def accepted(self) -> int:
        return len(self.records)

    @property
    def rejected(self) -> int:
        return len(self.rejections)

    def by_style(self) -> dict[str, dict[str, int]]:
        out = {s: {"accepted": 0, "rejected": 0} for s in self.styles}
        for rec in self.records:
            out[rec["style"]]["accepted"] += 1
        for rej in self.rejections:
            out[rej.file.split("/", 1)[0]]["rejected"] += 1
        return out

    def by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(r.reason for r in self.rejections).items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "raw_dir": self.raw_dir,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "by_style": self.by_style(),
            "by_reason": self.by_reason(),
            "rejections": [r.to_dict() for r in self.rejections],
            "warnings": [w.to_dict() for w in self.warnings],
        }

    def to_markdown(self) -> str:
        lines = [
            "# Ingest report",
            "",
            f"Source: `{self.raw_dir}`. Accepted **{self.accepted}** images, rejected **{self.rejected}** files.",
            "",
            "| style | accepted | rejected |",
            "|---|---:|---:|",
        ]
        for style, counts in self.by_style().items():
            lines.append(f"| {style} | {counts['accepted']} | {counts['rejected']} |")
        lines += ["", "## Rejected files", ""]
        if not self.rejections:
            lines.append("None: every file was usable.")
        else:
            lines += ["| file | reason | detail | what to do |", "|---|---|---|---|"]
            for r in self.rejections:
                lines.append(f"| `{r.file}` | {r.reason} | {_md(r.detail)} | {_md(REMEDIES.get(r.reason, ''))} |")
        if self.warnings:
            lines += ["", "## Warnings", "", "| file | issue | detail |", "|---|---|---|"]
            for w in self.warnings:
                lines.append(f"| `{w.file}` | {w.reason} | {_md(w.detail)} |")
        return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_ingest_reports(report: IngestReport, json_path: Path | None, md_path: Path | None) -> None:
    """Write ``reports/ingest.json`` and the human-readable ``reports/ingest.md`` atomically."""
    if json_path is not None:
        write_json(Path(json_path), report.to_dict())
    if md_path is not None:
        atomic_write_text(Path(md_path), report.to_markdown())


def _read_metadata(folder: Path, raw_dir: Path, warnings: list[Rejection]) -> dict[Path, tuple[str, str]]:
    """Captions from every ``metadata.jsonl`` under ``folder``: resolved image path -> (text, jsonl)."""
    captions: dict[Path, tuple[str, str]] = {}
    for meta in sorted(folder.rglob(METADATA_FILE)):
        rel = meta.relative_to(raw_dir).as_posix()
        try:
            lines = meta.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            warnings.append(Rejection(rel, "unreadable_metadata", f"could not read it as UTF-8 ({exc}); no captions taken from it"))
            continue
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name, text = entry["file_name"], entry["text"]
                if not isinstance(name, str) or not isinstance(text, str):
                    raise TypeError("file_name and text must be strings")
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                warnings.append(
                    Rejection(
                        f"{rel}:{lineno}",
                        "bad_metadata_line",
                        f'expected {{"file_name": "...", "text": "..."}} ({type(exc).__name__}: {exc}); line skipped',
                    )
                )
                continue
            captions[(meta.parent / name).resolve()] = (text, rel)
    return captions


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImageRejected("unreadable_caption", f"{path.name} is not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise ImageRejected("unreadable_caption", f"{path.name} could not be read ({exc.strerror or exc})") from None


def _normalise_caption(text: str) -> str:
    return " ".join(text.split())


def _style_files(folder: Path) -> list[Path]:
    # broken symlinks are not files but must still be reported, not silently skipped
    found = (p for p in folder.rglob("*") if p.is_file() or (p.is_symlink() and not p.exists()))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def check_raw_dir(raw_dir: Path, styles: list[str]) -> None:
    """Fail early, naming the missing folder and the fix, if the raw layout is wrong."""
    if not raw_dir.is_dir():
        raise DataError(
            f"raw data folder {raw_dir} does not exist. With data.source: embedded run "
            f"`python -m stages.sample_data --out {raw_dir}` (or `dvc repro sample_data`); with "
            f"data.source: local put your photos in {raw_dir}/<style>/ for each style in data.styles."
        )
    missing = [s for s in styles if not (raw_dir / s).is_dir()]
    if missing:
        present = sorted(p.name for p in raw_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DataError(
            f"style folder(s) {', '.join(str(raw_dir / s) for s in missing)} not found "
            f"(data.styles={styles}; folders present: {present or 'none'}). Create one folder per "
            f"style with its images and captions, or fix data.styles in params.yaml."
        )


def ingest(raw_dir: Path, out_dir: Path, cfg: DataConfig) -> IngestReport:
    """Normalise every usable image under ``raw_dir/<style>/`` into ``out_dir``; report the rest.

    Never raises for a bad file (it is listed in the report); raises :class:`DataError`
    only when the folder layout itself is wrong.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    check_raw_dir(raw_dir, list(cfg.styles))
    report = IngestReport(raw_dir=raw_dir.as_posix(), styles=list(cfg.styles))
    seen_sha: dict[str, str] = {}
    with atomic_dir(out_dir) as tmp:
        for style in cfg.styles:
            folder = raw_dir / style
            (tmp / "images" / style).mkdir(parents=True)
            captions = _read_metadata(folder, raw_dir, report.warnings)
            used_captions: set[Path] = set()
            files = _style_files(folder)
            for path in tqdm(files, desc=f"ingest {style}", unit="file", disable=None, leave=False):
                rel = path.relative_to(raw_dir).as_posix()
                name = path.name.lower()
                if name in _CONSUMED_NAMES or path.suffix.lower() == ".txt":
                    continue
                if _is_hidden(path, folder):
                    report.rejections.append(Rejection(rel, "hidden_file", "names starting with '.' are skipped"))
                    continue
                try:
                    record = _ingest_one(path, rel, style, tmp, cfg, captions, used_captions, seen_sha)
                except ImageRejected as exc:
                    report.rejections.append(Rejection(rel, exc.reason, exc.detail))
                    logger.debug("rejected %s: %s", rel, exc)
                    continue
                report.records.append(record)
            # a caption is only orphaned if no file of its name exists (a rejected image's
            # caption is not: the image's rejection already explains it)
            claimed = {p.with_suffix(".txt").resolve() for p in files if p.suffix.lower() != ".txt"}
            for path in files:
                if path.suffix.lower() == ".txt" and path.resolve() not in claimed:
                    report.warnings.append(
                        Rejection(
                            path.relative_to(raw_dir).as_posix(),
                            "orphan_caption",
                            "no image with the same name next to it; check the file names match",
                        )
                    )
            for target in sorted(set(captions) - used_captions):
                if not target.exists():
                    report.warnings.append(
                        Rejection(
                            captions[target][1],
                            "missing_file",
                            f"it names {target.name}, which does not exist",
                        )
                    )
        manifest = "".join(json.dumps(r, sort_keys=True) + "\n" for r in report.records)
        atomic_write_text(tmp / MANIFEST_FILE, manifest)
        # only the keys that shape this output, so the file matches what the stage depends on
        used = cfg.model_dump(include={"styles", "resolution", "min_size", "extensions"})
        if cfg.buckets:
            used.update(cfg.model_dump(include={"buckets", "bucket_step", "bucket_max_ratio"}))
        atomic_write_text(tmp / "data_config.yaml", yaml.safe_dump(used, sort_keys=False))
    for style, counts in report.by_style().items():
        if counts["accepted"] == 0:
            logger.warning("style %r: no image accepted from %s", style, raw_dir / style)
    logger.info("ingest: %d accepted, %d rejected -> %s", report.accepted, report.rejected, out_dir)
    return report


def _ingest_one(
    path: Path,
    rel: str,
    style: str,
    tmp: Path,
    cfg: DataConfig,
    captions: dict[Path, tuple[str, str]],
    used_captions: set[Path],
    seen_sha: dict[str, str],
) -> dict[str, Any]:
    check_extension(path, list(cfg.extensions))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageRejected("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from None
    sha = hashlib.sha256(data).hexdigest()
    if sha in seen_sha:
        raise ImageRejected("duplicate_file", f"same bytes as {seen_sha[sha]}, which was already accepted")
    loaded = decode_image(data)
    check_size(loaded, cfg.min_size)
    caption = _caption_for(path, captions, used_captions)
    if cfg.buckets:
        image = bucket_resize(loaded.image, bucket_sizes(cfg.resolution, cfg.bucket_step, cfg.bucket_max_ratio))
    else:
        image = square_resize(loaded.image, cfg.resolution)
    image_id = sha[:16]
    out_rel = f"images/{style}/{image_id}.png"
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(tmp / out_rel, buf.getvalue())
    seen_sha[sha] = rel
    return {
        "id": image_id,
        "style": style,
        "path": out_rel,
        "source": rel,
        "caption": caption,
        "width": image.width,
        "height": image.height,
        "orig_width": loaded.orig_width,
        "orig_height": loaded.orig_height,
        "phash": perceptual_hash(image),
        "sha256": sha,
    }


def _caption_for(path: Path, captions: dict[Path, tuple[str, str]], used: set[Path]) -> str:
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        used.add(sidecar.resolve())
        text = _normalise_caption(_read_caption(sidecar))
        source = sidecar.name
    elif path.resolve() in captions:
        used.add(path.resolve())
        text = _normalise_caption(captions[path.resolve()][0])
        source = captions[path.resolve()][1]
    else:
        raise ImageRejected("no_caption", f"no {sidecar.name} next to it and no {METADATA_FILE} entry for it")
    if not text:
        raise ImageRejected("empty_caption", f"the caption in {source} is empty")
    return text


def read_manifest(ingested_dir: Path) -> list[dict[str, Any]]:
    """Read ``manifest.jsonl`` from an ingest output, with a clear error if it is absent or bad."""
    path = Path(ingested_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: run the ingest stage first (`dvc repro ingest`).")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc}); re-run the ingest stage.") from exc
    return records
