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

Containment: ingest reads nothing outside ``data.raw_dir``. Every file, caption sidecar,
``metadata.jsonl`` and style folder is resolved (symlinks followed) and must stay inside
the resolved raw folder; a link that leads out is listed in the report as
``outside_raw_dir`` ("symlink points outside data.raw_dir: <target>") and never read, so an
outside file can neither become training data nor reach the DVC cache. Links that stay
inside the folder are followed normally; a dangling link is ``unreadable``.

Exact duplicates (same sha256 of the file bytes, in any style) keep one copy, chosen by
content only, never by file name or listing order: the copies have the same pixels, so the
rule looks at what differs: (1) the style that comes first in ``data.styles``, (2) a copy
with a usable caption over one without, (3) the caption text that sorts first. Only when
the captions are identical too -- the copies are then interchangeable and the output is the
same whichever is "kept" -- does the relative path label which one the report names. Each
dropped copy is listed as ``duplicate_file`` naming the kept file and the deciding rule.
Near-duplicates (similar but not identical pixels) are the curation stage's job
(:mod:`stunning.data.curate`), by a rule of the same kind.

Captions are decoded as UTF-8 (a BOM is allowed) or, with a byte-order mark, UTF-16; a
caption that is not text (undecodable, NUL bytes, lone surrogates, over
:data:`MAX_CAPTION_BYTES`) rejects its image as ``unreadable_caption``; a ``metadata.jsonl``
line that is not a ``{"file_name": str, "text": str}`` object is a ``bad_metadata_line``
warning, never a crash.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import unicodedata
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
#: Largest caption file read (far above any real caption; the text encoders keep ~77 tokens).
MAX_CAPTION_BYTES = 1 << 20


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


def _read_metadata(
    metas: list[Path], raw_dir: Path, warnings: list[Rejection]
) -> dict[Path, tuple[str, str]]:
    """Captions from the ``metadata.jsonl`` files ``metas``: resolved image path -> (text, jsonl).

    Never raises for the files' contents: an unreadable file or a line that is not a
    ``{"file_name": str, "text": str}`` object becomes a warning naming the file and line.
    """
    captions: dict[Path, tuple[str, str]] = {}
    for meta in sorted(metas):
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
                if not isinstance(entry, dict):
                    raise TypeError(f"a JSON {type(entry).__name__}, not an object")
                name, text = entry["file_name"], entry["text"]
                if not isinstance(name, str) or not isinstance(text, str):
                    raise TypeError("file_name and text must be strings")
                if not name or "\x00" in name:
                    raise ValueError("file_name must be a non-empty file name without NUL characters")
                target = (meta.parent / name).resolve()
            # ValueError covers JSONDecodeError and integers over Python's digit limit;
            # RecursionError deeply nested arrays; OSError a file_name the OS refuses
            except (ValueError, KeyError, TypeError, RecursionError, OSError) as exc:
                warnings.append(
                    Rejection(
                        f"{rel}:{lineno}",
                        "bad_metadata_line",
                        f'expected {{"file_name": "...", "text": "..."}} ({type(exc).__name__}: {_clip(str(exc))}); line skipped',
                    )
                )
                continue
            captions[target] = (text, rel)
    return captions


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _read_caption(path: Path) -> str:
    """The text of a caption file: UTF-8 (BOM allowed), or UTF-16 with a byte-order mark."""
    try:
        size = path.stat().st_size
        if size > MAX_CAPTION_BYTES:
            raise ImageRejected(
                "unreadable_caption", f"{path.name} is {size} bytes; a caption file is at most {MAX_CAPTION_BYTES}"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise ImageRejected("unreadable_caption", f"{path.name} could not be read ({exc.strerror or exc})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) and not data.startswith(b"\xff\xfe\x00\x00"):
        encoding, label = "utf-16", "UTF-16"
    else:
        encoding, label = "utf-8-sig", "UTF-8"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise ImageRejected(
            "unreadable_caption", f"{path.name} is not {label} text ({exc.reason} at byte {exc.start})"
        ) from None
    return text


def _normalise_caption(text: str, source: str = "the caption") -> str:
    """One line of text: control characters become spaces, runs of whitespace one space.

    Raises ``unreadable_caption`` for text that is not text: NUL characters (binary data)
    or lone surrogates (invalid Unicode, possible from a JSON escape in metadata.jsonl).
    """
    if "\x00" in text:
        raise ImageRejected("unreadable_caption", f"{source} contains NUL characters: binary data, not text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ImageRejected("unreadable_caption", f"{source} contains invalid Unicode (a lone surrogate)") from None
    if any(unicodedata.category(c) == "Cc" for c in text):
        text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    return " ".join(text.split())


@dataclass
class _Walk:
    """A style folder's contents: files inside data.raw_dir, and what was refused while walking."""

    files: list[Path] = field(default_factory=list)
    outside: dict[Path, Path] = field(default_factory=dict)  # link -> resolved target outside raw_dir
    unreadable: dict[Path, str] = field(default_factory=dict)  # folder -> why it could not be listed


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def _style_files(folder: Path, raw_root: Path) -> _Walk:
    """Every file under ``folder``, following links only while they stay inside ``raw_root``.

    A link (to a file or a folder) that resolves outside ``raw_root`` is recorded in
    ``outside`` and not followed; a dangling link is kept as a file (it is reported as
    unreadable, not silently skipped); each real folder is walked once (link cycles end).
    """
    walk = _Walk()
    visited: set[Path] = set()

    def visit(directory: Path) -> None:
        real = directory.resolve()
        if real in visited:
            return
        visited.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            walk.unreadable[directory] = exc.strerror or str(exc)
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_symlink():
                    if not path.exists():
                        walk.files.append(path)  # dangling: reported as unreadable
                        continue
                    target = path.resolve()
                    if not target.is_relative_to(raw_root):
                        walk.outside[path] = target
                    elif target.is_dir():
                        visit(path)
                    else:
                        walk.files.append(path)
                elif entry.is_dir():
                    visit(path)
                elif entry.is_file():
                    walk.files.append(path)
            except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
                walk.unreadable[path] = str(exc)

    visit(folder)
    walk.files.sort(key=lambda p: p.relative_to(folder).as_posix())
    return walk


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


@dataclass
class _Candidate:
    """A file that passed the cheap checks, before decoding: its hash and its caption."""

    style: str
    path: Path
    rel: str
    sha: str
    caption: str | None
    caption_error: ImageRejected | None

    def rank(self, style_order: dict[str, int]) -> tuple[int, int, str, str]:
        """The duplicate rule's order (lowest kept): style order, captioned first, caption text,
        then the path -- which only labels copies that are identical in bytes and caption."""
        return (style_order[self.style], self.caption is None, self.caption or "", self.rel)


def ingest(raw_dir: Path, out_dir: Path, cfg: DataConfig) -> IngestReport:
    """Normalise every usable image under ``raw_dir/<style>/`` into ``out_dir``; report the rest.

    Never raises for a bad file (it is listed in the report); raises :class:`DataError`
    only when the folder layout itself is wrong. Reads nothing outside ``raw_dir`` and
    resolves exact duplicates by content (see the module docstring).
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    check_raw_dir(raw_dir, list(cfg.styles))
    raw_root = raw_dir.resolve()
    report = IngestReport(raw_dir=raw_dir.as_posix(), styles=list(cfg.styles))
    style_order = {s: i for i, s in enumerate(cfg.styles)}
    candidates: list[_Candidate] = []
    with atomic_dir(out_dir) as tmp:
        for style in cfg.styles:
            folder = raw_dir / style
            (tmp / "images" / style).mkdir(parents=True)
            if not _inside(folder, raw_root):
                target = folder.resolve()
                report.rejections.append(
                    Rejection(style, "outside_raw_dir", f"symlink points outside data.raw_dir: {target}; the style folder is not read")
                )
                continue
            walk = _style_files(folder, raw_root)
            for link, target in walk.outside.items():
                report.rejections.append(
                    Rejection(link.relative_to(raw_dir).as_posix(), "outside_raw_dir", f"symlink points outside data.raw_dir: {target}")
                )
            for where, why in walk.unreadable.items():
                report.rejections.append(Rejection(where.relative_to(raw_dir).as_posix(), "unreadable", f"could not be listed ({why})"))
            files = walk.files
            metas = [p for p in files if p.name.lower() == METADATA_FILE and not _is_hidden(p, folder)]
            captions = _read_metadata(metas, raw_dir, report.warnings)
            used_captions: set[Path] = set()
            for path in files:
                rel = path.relative_to(raw_dir).as_posix()
                name = path.name.lower()
                if name in _CONSUMED_NAMES or path.suffix.lower() == ".txt":
                    continue
                if _is_hidden(path, folder):
                    report.rejections.append(Rejection(rel, "hidden_file", "names starting with '.' are skipped"))
                    continue
                try:
                    check_extension(path, list(cfg.extensions))
                    sha = _sha256(path)
                except ImageRejected as exc:
                    report.rejections.append(Rejection(rel, exc.reason, exc.detail))
                    continue
                try:
                    caption, caption_error = _caption_for(path, captions, used_captions, walk.outside), None
                except ImageRejected as exc:
                    caption, caption_error = None, exc
                candidates.append(_Candidate(style, path, rel, sha, caption, caption_error))
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

        groups: dict[str, list[_Candidate]] = {}
        for cand in candidates:
            groups.setdefault(cand.sha, []).append(cand)
        for group in tqdm(list(groups.values()), desc="ingest", unit="image", disable=None, leave=False):
            group.sort(key=lambda c: c.rank(style_order))
            kept: _Candidate | None = None
            for cand in group:
                if kept is not None:
                    report.rejections.append(Rejection(cand.rel, "duplicate_file", _duplicate_detail(cand, kept)))
                    continue
                try:
                    record = _ingest_one(cand, tmp, cfg)
                except ImageRejected as exc:
                    report.rejections.append(Rejection(cand.rel, exc.reason, exc.detail))
                    logger.debug("rejected %s: %s", cand.rel, exc)
                    continue
                report.records.append(record)
                kept = cand
        report.records.sort(key=lambda r: (style_order[r["style"]], r["source"]))
        report.rejections.sort(key=lambda r: (style_order.get(r.file.split("/", 1)[0], -1), r.file))
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise ImageRejected("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _duplicate_detail(cand: _Candidate, kept: _Candidate) -> str:
    if cand.style != kept.style:
        why = f"its style {kept.style!r} comes before {cand.style!r} in data.styles"
    elif cand.caption is None:
        why = "it has a usable caption and this copy has not"
    elif cand.caption != kept.caption:
        why = f"its caption {_clip(kept.caption or '', 80)!r} sorts before this copy's {_clip(cand.caption, 80)!r}"
    else:
        why = "the captions are identical too, so the copies are interchangeable"
    return f"same bytes (sha256 {cand.sha[:16]}) as {kept.rel}, which is kept: {why}"


def _ingest_one(cand: _Candidate, tmp: Path, cfg: DataConfig) -> dict[str, Any]:
    path, rel, style = cand.path, cand.rel, cand.style
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageRejected("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from None
    sha = hashlib.sha256(data).hexdigest()
    if sha != cand.sha:
        raise ImageRejected("unreadable", "the file changed while ingest was reading it; run ingest again")
    loaded = decode_image(data)
    check_size(loaded, cfg.min_size)
    if cand.caption_error is not None:
        raise cand.caption_error
    caption = cand.caption or ""
    if cfg.buckets:
        image = bucket_resize(loaded.image, bucket_sizes(cfg.resolution, cfg.bucket_step, cfg.bucket_max_ratio))
    else:
        image = square_resize(loaded.image, cfg.resolution)
    image_id = sha[:16]
    out_rel = f"images/{style}/{image_id}.png"
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(tmp / out_rel, buf.getvalue())
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


def _caption_for(
    path: Path, captions: dict[Path, tuple[str, str]], used: set[Path], outside: dict[Path, Path] | None = None
) -> str:
    sidecar = path.with_suffix(".txt")
    if outside and sidecar in outside:
        raise ImageRejected(
            "outside_raw_dir", f"its caption {sidecar.name}: symlink points outside data.raw_dir: {outside[sidecar]}"
        )
    if sidecar.is_file():
        used.add(sidecar.resolve())
        source = sidecar.name
        text = _normalise_caption(_read_caption(sidecar), source)
    elif path.resolve() in captions:
        used.add(path.resolve())
        raw_text, source = captions[path.resolve()]
        text = _normalise_caption(raw_text, f"its {source} entry")
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
