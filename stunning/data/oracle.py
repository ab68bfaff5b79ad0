"""An analytic oracle for the procedural fashion world of :mod:`stunning.data.sample`.

A text-to-image model trained on the embedded sample is asked for, say, "a red dress on a
white background, on the left"; to measure *prompt adherence* exactly we need something
that reads a generated image and says which garment, garment colour, background and
position it shows. A learned classifier would bring its own errors and training; this
module instead inverts the (known) renderer of :func:`stunning.data.sample.render_clean`
with numpy + Pillow only:

* the **background** colour is read from the top and bottom rows, which objects never
  reach (see ``_garment_mask``), after dividing out the renderer's studio-light gradient,
  and classified to the nearest :data:`~stunning.data.sample.BACKGROUNDS` entry up to a
  brightness scale (light, shading and a model's drift change brightness, not hue);
* the **foreground** is every pixel that is not the local background or its shadow (a
  darker copy of it); its robust (median) colour, with the garment shading divided out,
  is classified to the nearest :data:`~stunning.data.sample.GARMENT_COLOURS` entry, again
  up to a brightness scale;
* the **garment** and **position** come from matching the soft foreground mask against
  every garment outline (rendered by the sample's own ``_garment_mask``) at every position
  offset, jitter and scale the world allows, by least squares.

Images of any square size (16-128 px) are resized to a fixed working size of 32 px, the
size the micro model is trained at. :func:`read_image` reads one image, :func:`parse_caption`
reads what a caption/prompt asks for, and :func:`adherence` scores images against prompts
per attribute.

Accuracy when written: every attribute of 1000 clean renders read correctly at 16, 32, 64 and
128 px, and at 32 px with added Gaussian noise (sigma 0.04-0.12, with or without a 0.7 px
blur) or a 1.5 px blur; ``tests/test_oracle.py`` holds looser floors. About 1 ms per image.
It reads the *clean* world: impressionist renders keep colour, garment and position but their
warm-tinted white backgrounds read as beige, and noir (monochrome) has no colour to read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from stunning.data.sample import (
    BACKGROUNDS,
    GARMENT_COLOURS,
    GARMENTS,
    POSITIONS,
    SIZE,
    Scene,
    _garment_mask,
)

__all__ = ["ATTRIBUTES", "WORK_SIZE", "Reading", "adherence", "parse_caption", "read_image", "read_images"]

WORK_SIZE = 32  # every image is read at this size (the micro model's training resolution)
ATTRIBUTES: tuple[str, ...] = ("colour", "background", "garment", "position")

_MIN_SIDE = 16  # smaller images are refused; 16-128 px is the tested range
# A garment covers about 8-25% of the frame in this world; far outside that the "foreground"
# is noise, an empty canvas or a wash of colour, and no garment reading is given.
_MIN_FOREGROUND, _MAX_FOREGROUND = 0.03, 0.45
_FG_THRESHOLD = 0.12  # RGB distance (in [0,1] units) from the background line that is foreground
_SHADOW_SCALES = (0.7, 1.06)  # background brightness range incl. the garment's drop shadow
_BG_SCALES = (0.8, 1.25)  # brightness tolerance when naming a background colour
_FG_SCALES = (0.7, 1.25)  # ... and a garment colour
_BG_TOLERANCE = 0.15  # farther than this from every background: not a background of this world
_FG_TOLERANCE = 0.25  # ... from every garment colour: no colour reading
_NOISY_SIGMA = 0.02  # background-row noise (per channel) above which the image is smoothed
_MAX_BG_SIGMA = 0.15  # ... above which there is no flat background to name
_TEMPLATE_SCALES = np.linspace(0.85, 1.15, 7)
_SHIFT_X = range(-15, 16)  # garment centre offsets from the frame centre, in 64 px units
_SHIFT_Y = range(-3, 4)
# IoU of the thresholded foreground with the best outline: clean renders score >= 0.8, noisy
# and blurred ones >= 0.7 (1st percentile), arbitrary ellipses/triangles often below 0.5
_MIN_SHAPE_IOU = 0.5
_COARSE_STEP = 2  # first-pass shift stride (template grid indices)
_FINE_RADIUS = 2  # second pass: shifts within this many grid steps of the first-pass best


@dataclass(frozen=True)
class Reading:
    """What the oracle sees in one image; names are keys of the sample's tables.

    ``colour``, ``garment`` and ``position`` are None when the image shows no readable
    garment: a foreground fraction outside the plausible 3-45% of the frame (an empty canvas,
    noise, a wash of colour). Beyond that, ``colour`` is None when the foreground colour is far
    from every garment colour, ``garment`` when no outline fits the foreground's shape, and
    ``background`` when the border rows are not one flat background colour of this world.
    ``foreground_fraction`` is the share of pixels that differ from the background.
    """

    colour: str | None
    background: str | None
    garment: str | None
    position: str | None
    foreground_fraction: float


# ----------------------------------------------------------------------------- geometry


def _grid(n: int) -> np.ndarray:
    """Normalised coordinates in the renderer's 64 px frame of the centres of n pixels."""
    centres = (np.arange(n) + 0.5) * SIZE / n - 0.5
    return centres / (SIZE - 1)


_YY = _grid(WORK_SIZE)[:, None] * np.ones((1, WORK_SIZE))
_XX = np.ones((WORK_SIZE, 1)) * _grid(WORK_SIZE)[None, :]
_LIGHT = (1.08 - 0.16 * (0.6 * _YY + 0.4 * _XX))[..., None]  # render_clean's background light
_SHADING = (1.1 - 0.25 * _YY)[..., None]  # render_clean's garment shading
# rows no garment (nor its shadow) reaches: the top two and the bottom one at 32 px
_BG_ROWS = np.zeros((WORK_SIZE, WORK_SIZE), dtype=bool)
_BG_ROWS[: max(1, WORK_SIZE // 16)] = True
_BG_ROWS[-max(1, WORK_SIZE // 32) :] = True


@dataclass(frozen=True)
class _Templates:
    """Garment coverage masks at work size, indexed [garment, scale, shift_y, shift_x, pixel]."""

    masks: np.ndarray  # (G, S, NY, NX, WORK_SIZE**2) float32
    half_sq_norm: np.ndarray  # (G, S, NY, NX) 0.5 * |mask|^2
    coarse: np.ndarray  # (G, CY, CX, P): the middle scale on every other shift, for the first pass
    coarse_half_sq_norm: np.ndarray  # (G, CY, CX)


@lru_cache(maxsize=1)
def _templates() -> _Templates:
    """Every garment's coverage mask at every allowed centre offset and scale, at work size."""
    factor = SIZE // WORK_SIZE
    pad_x, pad_y = max(map(abs, _SHIFT_X)), max(map(abs, _SHIFT_Y))
    masks = np.empty(
        (len(GARMENTS), len(_TEMPLATE_SCALES), len(_SHIFT_Y), len(_SHIFT_X), WORK_SIZE * WORK_SIZE), dtype=np.float32
    )
    for g, garment in enumerate(GARMENTS):
        for k, scale in enumerate(_TEMPLATE_SCALES):
            mask = _garment_mask(Scene(garment, "red", "white", "centre", 0.0, 0.0, float(scale)))
            padded = np.pad(mask, ((pad_y, pad_y), (pad_x, pad_x)))
            for iy, sy in enumerate(_SHIFT_Y):
                for ix, sx in enumerate(_SHIFT_X):
                    crop = padded[pad_y - sy : pad_y - sy + SIZE, pad_x - sx : pad_x - sx + SIZE]
                    masks[g, k, iy, ix] = crop.reshape(WORK_SIZE, factor, WORK_SIZE, factor).mean(axis=(1, 3)).ravel()
    coarse = np.ascontiguousarray(masks[:, len(_TEMPLATE_SCALES) // 2, 1::_COARSE_STEP, 1::_COARSE_STEP])
    return _Templates(
        masks=masks,
        half_sq_norm=0.5 * np.einsum("...p,...p->...", masks, masks),
        coarse=coarse,
        coarse_half_sq_norm=0.5 * np.einsum("...p,...p->...", coarse, coarse),
    )


def _match(alphas: np.ndarray) -> list[tuple[int, int, float]]:
    """Best (garment index, x shift in 64 px units, IoU) for each column of (P, n) soft masks.

    Least squares |alpha - mask|^2 over garments, scales and shifts, coarse to fine: the
    middle scale on every other shift finds each garment's neighbourhood, then every scale
    and shift within _FINE_RADIUS of it decides. The IoU is that of the best outline with the
    foreground, both thresholded at one half: how well the shape fits at all.
    """
    t = _templates()
    n_garments, _, ny, nx, _ = t.masks.shape
    coarse = t.coarse_half_sq_norm[..., None] - np.einsum("gyxp,pn->gyxn", t.coarse, alphas)
    out = []
    r = _FINE_RADIUS
    for j in range(alphas.shape[1]):
        alpha = alphas[:, j]
        best: tuple[float, int, tuple[int, int, int]] = (np.inf, 0, (0, 0, 0))
        for g in range(n_garments):
            cy, cx = np.unravel_index(int(np.argmin(coarse[g, :, :, j])), coarse.shape[1:3])
            iy, ix = 1 + _COARSE_STEP * int(cy), 1 + _COARSE_STEP * int(cx)
            y0, y1, x0, x1 = max(0, iy - r), min(ny, iy + r + 1), max(0, ix - r), min(nx, ix + r + 1)
            scores = t.half_sq_norm[g, :, y0:y1, x0:x1] - t.masks[g, :, y0:y1, x0:x1] @ alpha
            k = int(np.argmin(scores))
            if scores.flat[k] < best[0]:
                ks, ky, kx = np.unravel_index(k, scores.shape)
                best = (float(scores.flat[k]), g, (int(ks), y0 + int(ky), x0 + int(kx)))
        _, g, (ks, iy, ix) = best
        mask = t.masks[g, ks, iy, ix]
        a_bin, m_bin = alpha >= 0.5, mask >= 0.5
        iou = float((a_bin & m_bin).sum() / max(int((a_bin | m_bin).sum()), 1))
        out.append((g, _SHIFT_X[ix], iou))
    return out


# ----------------------------------------------------------------------------- colour


def _scaled_distance(colours: np.ndarray, refs: np.ndarray, scales: tuple[float, float]) -> np.ndarray:
    """min over s in [lo, hi] of |colour - s * ref|, for (..., 3) colours against (..., 3) refs."""
    dot = np.sum(colours * refs, axis=-1)
    norm2 = np.maximum(np.sum(refs * refs, axis=-1), 1e-12)
    s = np.clip(dot / norm2, scales[0], scales[1])
    return np.linalg.norm(colours - s[..., None] * refs, axis=-1)


def _nearest(
    colour: np.ndarray, table: dict[str, tuple[int, int, int]], scales: tuple[float, float]
) -> tuple[str, float]:
    """The table entry nearest to an RGB colour up to a brightness scale, and its distance."""
    names = list(table)
    refs = np.asarray([table[n] for n in names], dtype=np.float64) / 255.0
    dist = _scaled_distance(colour[None, :], refs, scales)
    k = int(np.argmin(dist))
    return names[k], float(dist[k])


# ----------------------------------------------------------------------------- reading


def _to_work_array(img: Image.Image | np.ndarray) -> np.ndarray:
    """Any PIL image or HxW[x3|4] array (uint8, or float in [0,1]) -> float RGB at work size."""
    if isinstance(img, Image.Image):
        pil = img.convert("RGB")
    else:
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ValueError(f"expected an HxW, HxWx3 or HxWx4 image array, got shape {arr.shape}")
        arr = arr[..., :3]
        if arr.dtype != np.uint8:
            arr = np.round(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
        if arr.shape[0] == arr.shape[1] == WORK_SIZE:
            return arr.astype(np.float64) / 255.0
        pil = Image.fromarray(arr, mode="RGB")
    w, h = pil.size
    if w != h or w < _MIN_SIDE:
        raise ValueError(f"the oracle reads square images of at least {_MIN_SIDE} px, got {w}x{h}")
    if w != WORK_SIZE:
        pil = pil.resize((WORK_SIZE, WORK_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(pil, dtype=np.float64) / 255.0


@dataclass(frozen=True)
class _Features:
    background: str | None
    colour: str | None
    alpha: np.ndarray | None  # soft foreground mask, flattened; None if no garment
    fraction: float
    colour_distance: float
    background_distance: float


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 mean filter with edge replication (for noisy images)."""
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    n = x.shape[0]
    return sum(p[i : i + n, j : j + n] for i in range(3) for j in range(3)) / 9.0


def _features(x: np.ndarray) -> _Features:
    bg_pixels = (x / _LIGHT)[_BG_ROWS]
    bg_colour = np.median(bg_pixels, axis=0)
    background, bg_dist = _nearest(bg_colour, BACKGROUNDS, _BG_SCALES)
    # noise level from the background rows; grainy images are smoothed before masking
    resid = bg_pixels - bg_colour
    sigma = float(1.4826 * np.median(np.abs(resid - np.median(resid, axis=0))))
    if bg_dist > _BG_TOLERANCE or sigma > _MAX_BG_SIGMA:
        background = None  # not a flat background colour of this world
    if sigma > _NOISY_SIGMA:
        x = _box3(x)
        sigma /= 3.0
    bg_plane = bg_colour[None, None, :] * _LIGHT
    dist = _scaled_distance(x, bg_plane, _SHADOW_SCALES)
    fg = dist > max(_FG_THRESHOLD, 5.0 * sigma)
    fraction = float(fg.mean())
    if not _MIN_FOREGROUND <= fraction <= _MAX_FOREGROUND:
        return _Features(background, None, None, fraction, np.inf, bg_dist)
    # interior pixels (4-neighbours also foreground) are free of edge mixing
    inner = fg.copy()
    inner[1:, :] &= fg[:-1, :]
    inner[:-1, :] &= fg[1:, :]
    inner[:, 1:] &= fg[:, :-1]
    inner[:, :-1] &= fg[:, 1:]
    pick = inner if inner.sum() >= 6 else fg
    # of those, the most garment-like half (blur and anti-aliasing pull edges to the background)
    pick &= dist >= np.median(dist[pick])
    fg_colour = np.median((x / _SHADING)[pick], axis=0)
    colour, fg_dist = _nearest(fg_colour, GARMENT_COLOURS, _FG_SCALES)
    if fg_dist > _FG_TOLERANCE:
        colour = None
    full = _scaled_distance(fg_colour[None, None, :] * _SHADING, bg_plane, _SHADOW_SCALES)
    alpha = np.clip(dist / np.maximum(full, 1e-6), 0.0, 1.0)
    return _Features(background, colour, alpha.ravel().astype(np.float32), fraction, fg_dist, bg_dist)


def _position_name(shift_x: float) -> str:
    cx = (0.5 * SIZE + shift_x) / SIZE
    return min(POSITIONS, key=lambda p: abs(POSITIONS[p] - cx))


def _read_batch(arrays: list[np.ndarray]) -> list[Reading]:
    feats = [_features(a) for a in arrays]
    with_garment = [i for i, f in enumerate(feats) if f.alpha is not None]
    matches: dict[int, tuple[int, int, float]] = {}
    if with_garment:
        alphas = np.stack([feats[i].alpha for i in with_garment], axis=1)  # type: ignore[misc]
        matches = dict(zip(with_garment, _match(alphas), strict=True))
    out = []
    for i, f in enumerate(feats):
        if i in matches:
            g, shift_x, iou = matches[i]
            # a blob that fits no outline well is no garment of this world (colour and place still read)
            garment = GARMENTS[g] if iou >= _MIN_SHAPE_IOU else None
            out.append(Reading(f.colour, f.background, garment, _position_name(shift_x), f.fraction))
        else:
            out.append(Reading(None, f.background, None, None, f.fraction))
    return out


def read_image(img: Image.Image | np.ndarray) -> Reading:
    """Read the garment, its colour, the background and the position from one image.

    ``img`` is a square PIL image or an HxW(x3|x4) array (uint8, or float in [0, 1]) of at
    least 16 px; it is resized (LANCZOS) to the 32 px working size.
    """
    return _read_batch([_to_work_array(img)])[0]


def read_images(images: Sequence[Image.Image | np.ndarray]) -> list[Reading]:
    """:func:`read_image` for many images at once (the template match is one matrix product)."""
    return _read_batch([_to_work_array(img) for img in images])


# ----------------------------------------------------------------------------- captions

_CAPTION = re.compile(
    r"^(?:a pair of (?P<tcolour>[a-z]+) trousers|an? (?P<colour>[a-z]+) (?P<garment>[a-z]+))"
    r" on a (?P<background>[a-z]+) background"
    r"(?:, on the (?P<position>[a-z]+))?"
    r"(?:, (?P<style>[a-z][a-z _-]*) style)?$"
)


def parse_caption(caption: str) -> dict[str, str | None]:
    """What a caption/prompt of the sample's grammar asks for: colour, garment, background, position.

    ``"a pair of blue trousers on a grey background, on the left, noir style"`` ->
    ``{"colour": "blue", "garment": "trousers", "background": "grey", "position": "left"}``;
    no position clause means ``"centre"``, and the ``", <style> style"`` suffix is optional.
    Case and runs of whitespace are ignored, and either article ("a"/"an") is accepted.
    Raises ValueError naming the caption when it does not follow the grammar or names a
    garment, colour, background or position the world does not have.
    """
    text = " ".join(caption.strip().lower().split())
    m = _CAPTION.match(text)
    if m is None:
        raise ValueError(
            f"caption {caption!r} does not follow the sample grammar "
            "'<a|an> <colour> <garment> | a pair of <colour> trousers' + ' on a <background> background'"
            " + optional ', on the <left|right>' + optional ', <style> style'"
        )
    garment = "trousers" if m["tcolour"] else m["garment"]
    parsed: dict[str, str | None] = {
        "colour": m["tcolour"] or m["colour"],
        "garment": garment,
        "background": m["background"],
        "position": m["position"] or "centre",
    }
    problems = []
    if parsed["colour"] not in GARMENT_COLOURS:
        problems.append(f"colour {parsed['colour']!r} not in {list(GARMENT_COLOURS)}")
    if garment not in GARMENTS or (garment == "trousers") != bool(m["tcolour"]):
        problems.append(f"garment {garment!r} not in {list(GARMENTS)} (trousers only as 'a pair of')")
    if parsed["background"] not in BACKGROUNDS:
        problems.append(f"background {parsed['background']!r} not in {list(BACKGROUNDS)}")
    if parsed["position"] not in POSITIONS:
        problems.append(f"position {parsed['position']!r} not in {list(POSITIONS)}")
    if problems:
        raise ValueError(f"caption {caption!r}: " + "; ".join(problems))
    return parsed


# ----------------------------------------------------------------------------- scoring


def adherence(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
    """Per-attribute accuracy of images against the prompts they were generated from.

    Returns ``{"colour", "background", "garment", "position"}`` as fractions in [0, 1] (an
    unreadable attribute counts as wrong) and ``"n"``, the number of images (0 images give
    accuracies of 0). Raises ValueError for a prompt outside the grammar or a length mismatch.
    """
    if len(images) != len(prompts):
        raise ValueError(f"adherence needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    expected = [parse_caption(p) for p in prompts]
    readings = read_images(images)
    n = len(readings)
    result: dict[str, float] = {}
    for attr in ATTRIBUTES:
        hits = sum(
            getattr(r, attr) is not None and getattr(r, attr) == e[attr]
            for r, e in zip(readings, expected, strict=True)
        )
        result[attr] = hits / n if n else 0.0
    result["n"] = n
    return result
