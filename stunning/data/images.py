"""Robust image loading and the per-image numbers the data pipeline relies on.

Every photo that enters the pipeline goes through :func:`decode_image` (verify, apply the
EXIF orientation, flatten to RGB on white) and :func:`square_resize` (shorter side to the
training resolution, centre crop). Anything that cannot be used raises
:class:`ImageRejected` with a machine-readable ``reason`` and a human ``detail`` so the
ingest report can say exactly what was wrong with which file. :func:`blur_score` and
:func:`perceptual_hash` feed the curation filters.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

RejectReason = Literal[
    "unreadable",
    "undecodable",
    "truncated",
    "too_small",
    "unsupported_extension",
    "no_caption",
    "empty_caption",
    "unreadable_caption",
    "duplicate_file",
    "hidden_file",
    "outside_raw_dir",
    "too_large",
]

#: Most pixels an input may declare (Pillow's own decompression-bomb warning threshold). A
#: header claiming more is refused before any pixel is decoded: a few-kilobyte PNG can
#: declare a 50000x50000 image and expand to gigabytes.
MAX_IMAGE_PIXELS = 89_478_485

#: What a person should do about each rejection; used in the Markdown ingest report.
REMEDIES: dict[str, str] = {
    "unreadable": "The file could not be read (permissions, a broken link, a cloud placeholder). "
    "Fix access to it or remove it.",
    "undecodable": "The file is not an image Pillow can read (wrong extension or corrupt). "
    "Re-export it as PNG/JPEG/WebP or delete it.",
    "truncated": "The image data stops early (interrupted copy/download). Copy the original again.",
    "too_small": "The shorter side is below data.min_size. Use a larger original or lower data.min_size.",
    "unsupported_extension": "The extension is not in data.extensions. Convert it to PNG/JPEG/WebP, "
    "or add the extension to data.extensions if Pillow can read it.",
    "no_caption": "Add a caption: a same-name .txt next to the image, or a line "
    '{"file_name": ..., "text": ...} in the folder\'s metadata.jsonl.',
    "empty_caption": "The caption is empty. Write a short description of the image in its caption.",
    "unreadable_caption": "The caption file is not UTF-8 text. Save it as UTF-8.",
    "duplicate_file": "Byte-identical to a file already accepted. Delete one of the copies.",
    "hidden_file": "Hidden files (name starting with '.') are skipped. Rename it if it is a photo.",
    "outside_raw_dir": "A symlink (or a folder link) that leads outside data.raw_dir: ingest reads only files "
    "inside the data folder. Copy the file into the folder instead of linking to it.",
    "too_large": "The image declares more pixels than ingest decodes (possibly a decompression bomb). "
    "Downscale it before adding it.",
}


class ImageRejected(Exception):
    """An input file that cannot be used, with a reason code and a human-readable detail."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: RejectReason = reason
        self.detail = detail


@dataclass(frozen=True)
class LoadedImage:
    """A decoded, upright RGB image and its size before resizing."""

    image: Image.Image
    orig_width: int
    orig_height: int


def check_extension(path: Path, extensions: list[str]) -> None:
    """Raise ``unsupported_extension`` unless the file's suffix is one of ``extensions``."""
    allowed = {e.lower().lstrip(".") for e in extensions}
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in allowed:
        raise ImageRejected(
            "unsupported_extension",
            f"extension {path.suffix or '(none)'!r} is not one of data.extensions {sorted(allowed)}",
        )


def _looks_truncated_webp(data: bytes) -> bool:
    # libwebp reports a cut-off file only as "could not create decoder object"; the RIFF
    # header states the full length, so compare it with what is actually there.
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    return int.from_bytes(data[4:8], "little") + 8 > len(data)


def _classify_decode_error(data: bytes, exc: Exception) -> ImageRejected:
    msg = str(exc) or type(exc).__name__
    lowered = msg.lower()
    if "truncat" in lowered or "broken" in lowered or _looks_truncated_webp(data):
        return ImageRejected("truncated", f"image data ends early ({msg})")
    return ImageRejected("undecodable", f"Pillow could not decode it ({type(exc).__name__}: {msg})")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparency is composited on white, not dropped to black."""
    if img.mode.startswith("I") or img.mode == "F":
        # 16-bit (and 32-bit) greyscale: Pillow's own conversion clips to 255, which turns
        # most of a 16-bit scan white, so rescale the 16-bit range to 8 bits instead.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0.0) > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        # Palette images may carry transparency in info; RGBA keeps it for compositing.
        img = img.convert("RGBA")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBa":
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def decode_image(data: bytes) -> LoadedImage:
    """Decode image bytes into an upright RGB image, or raise :class:`ImageRejected`.

    ``Image.verify`` catches structural damage (bad chunks, missing data) that a lazy open
    would not; since a verified image cannot be used afterwards, the bytes are reopened
    and fully loaded, which catches truncation in formats ``verify`` does not check.
    """
    try:
        with warnings.catch_warnings():  # the size check below rejects what Pillow only warns about
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
        with probe:
            width, height = probe.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageRejected(
                    "too_large",
                    f"its header declares {width}x{height} = {width * height} pixels, more than the "
                    f"{MAX_IMAGE_PIXELS} ingest decodes (a decompression bomb or a huge scan)",
                )
            probe.verify()
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        if _looks_truncated_webp(data):
            raise ImageRejected("truncated", "WebP data ends before the length in its header") from None
        raise ImageRejected(
            "undecodable", "not a recognised image format (check the file really is an image)"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_large", f"refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # noqa: BLE001 -- any decoder failure is a rejection, never a crash
        raise _classify_decode_error(data, exc) from None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
    except Exception as exc:  # noqa: BLE001
        raise _classify_decode_error(data, exc) from None
    return LoadedImage(image=img, orig_width=img.width, orig_height=img.height)


def check_size(loaded: LoadedImage, min_size: int) -> None:
    """Raise ``too_small`` when the shorter side is below ``min_size`` pixels."""
    shorter = min(loaded.orig_width, loaded.orig_height)
    if shorter < min_size:
        raise ImageRejected(
            "too_small",
            f"{loaded.orig_width}x{loaded.orig_height}: shorter side {shorter}px < data.min_size={min_size}px",
        )


def square_resize(img: Image.Image, resolution: int) -> Image.Image:
    """Scale the shorter side to ``resolution`` and centre-crop to a square.

    ``ImageOps.fit`` crops to the target aspect first and then resamples, which gives the
    same framing as resize-then-crop with one resampling pass.
    """
    if img.size == (resolution, resolution):
        return img.copy()
    return ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def bucket_sizes(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets for `resolution`: (width, height) pairs, sides multiples of `step`.

    Each bucket holds at most ``resolution²`` pixels (so every batch costs about what a square
    one does), the widest side for each width, and aspect ratios up to `max_ratio` either
    way; the square bucket is always there. Sorted by aspect ratio (portrait first).
    """
    if step < 1 or resolution < step:
        raise ValueError(f"bucket step {step} must be between 1 and the resolution {resolution}")
    area = resolution * resolution
    sizes = {(resolution - resolution % step, resolution - resolution % step)}
    for w in range(step, int(resolution * max_ratio) + 1, step):
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio + 1e-9:
            sizes.add((w, h))
    return sorted(sizes, key=lambda wh: wh[0] / wh[1])


def bucket_resize(img: Image.Image, buckets: list[tuple[int, int]]) -> Image.Image:
    """Fit `img` to the bucket nearest its aspect ratio (in log space): cover, then centre-crop.

    Ties go to the larger bucket. This is what SDXL-era trainers call aspect-ratio
    bucketing: a portrait stays a portrait instead of losing its top and bottom to a square.
    """
    import math

    aspect = math.log(img.width / img.height)
    best = min(buckets, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - aspect), -wh[0] * wh[1]))
    if img.size == best:
        return img.copy()
    return ImageOps.fit(img, best, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def load_image(path: Path, *, resolution: int, min_size: int, extensions: list[str]) -> LoadedImage:
    """Check, decode and normalise one file; ``image`` is square at ``resolution``."""
    path = Path(path)
    check_extension(path, extensions)
    loaded = decode_image(path.read_bytes())
    check_size(loaded, min_size)
    return LoadedImage(square_resize(loaded.image, resolution), loaded.orig_width, loaded.orig_height)


def grayscale(img: Image.Image) -> np.ndarray:
    """Luminance as float64 on the 0-255 scale (ITU-R 601-2 weights, as Pillow's "L").

    Computed in floating point rather than with ``convert("L")``: rounding to 8 bits a
    second time adds noise whose Laplacian variance (~1.7) is comparable to a blurry
    image's whole score.
    """
    rgb = np.asarray(to_rgb(img), dtype=np.float64)
    return rgb @ np.array([0.299, 0.587, 0.114])


def blur_score(img: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian of the grayscale image (higher = sharper).

    The classic focus measure (Pech-Pacheco et al., 2000): edges and texture make the
    second derivative vary; a blurred image has a nearly flat Laplacian. Only interior
    pixels are used so no padding convention leaks in.
    """
    g = grayscale(img)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def perceptual_hash(img: Image.Image) -> str:
    """64-bit DCT perceptual hash (``imagehash.phash``) as a 16-character hex string."""
    return str(imagehash.phash(img))


def hash_distance(a: str, b: str) -> int:
    """Hamming distance between two hex perceptual hashes."""
    return int(imagehash.hex_to_hash(a) - imagehash.hex_to_hash(b))
