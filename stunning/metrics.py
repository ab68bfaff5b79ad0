"""Style metrics without a learned model: hand-made style features and a set distance.

Validation must say whether an adapter moved the base model towards its style, offline and
without downloading a feature network (CLIP/Inception). The styles this project cares
about differ in *how* a picture is painted — colourfulness, palette spread, tonal contrast,
grain, edges, vignetting — which simple image statistics capture well.

Features (:data:`FEATURES`), each computed on the image resized to
``ANALYSIS_SIZE``² (so sets of different resolutions are comparable) and scaled to a
roughly [0, 1] range by construction, so no feature dominates by its units:

- ``saturation_mean``/``saturation_std``: HSV saturation (colour vs monochrome);
- ``colourfulness``: Hasler & Süsstrunk (2003) opponent-colour statistic, ×2;
- ``hue_entropy``: entropy of the saturation-weighted hue histogram (12 bins plus one
  achromatic bin weighted by 1 − saturation), normalised
  (broken colour vs a single cast; 0 for grey images);
- ``luma_mean``/``luma_std`` (×2, RMS contrast)/``tonal_extremes`` (share of pixels below
  0.15 or above 0.85): tonal key and contrast;
- ``grain``: mean absolute Laplacian of luma, ×6 (high-frequency energy: film grain, dabs);
- ``edge_density``: share of pixels whose Sobel gradient magnitude exceeds 0.1;
- ``vignette``: luma of the centre minus luma of the border ring.

Set distance (:func:`set_distance`): the 2-Wasserstein (Fréchet) distance between
*diagonal* Gaussians fitted to the two sets' features, root-mean-squared over features:

    d(X, Y) = sqrt( mean_k [ (μ_Xk − μ_Yk)² + (σ_Xk − σ_Yk)² ] )

Why this and not the full-covariance Fréchet distance (FID-style): with ~8 images per set
and 10 features a covariance matrix is rank-deficient and its matrix square root noisy;
the diagonal form needs no inversion or shrinkage, is a true metric (symmetric, zero for
identical sets), and with fixed feature scales it is comparable across reference sets,
which the ratio behind ``style_gain`` needs. Correlated colour features give colour a
larger say than texture, which matches the styles at hand (colour vs monochrome first).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

ANALYSIS_SIZE = 64
HUE_BINS = 12
BLANK_STD = 1e-3  # pixel std (range [0, 1]) below which an image is considered blank
EDGE_THRESHOLD = 0.1  # Sobel gradient magnitude (luma per pixel) that counts as an edge

FEATURES: tuple[str, ...] = (
    "saturation_mean",
    "saturation_std",
    "colourfulness",
    "hue_entropy",
    "luma_mean",
    "luma_std",
    "tonal_extremes",
    "grain",
    "edge_density",
    "vignette",
)

ImageLike = Image.Image | str | Path


def _open(img: ImageLike) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    with Image.open(img) as im:
        return im.convert("RGB")


def _conv3(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """3x3 correlation with edge padding (numpy only; the images are tiny)."""
    p = np.pad(a, 1, mode="edge")
    h, w = a.shape
    return sum(k[i, j] * p[i : i + h, j : j + w] for i in range(3) for j in range(3))


_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64) / 4.0


def image_features(img: ImageLike) -> np.ndarray:
    """The style feature vector of one image (order: :data:`FEATURES`)."""
    rgb_img = _open(img)
    if rgb_img.size != (ANALYSIS_SIZE, ANALYSIS_SIZE):
        rgb_img = rgb_img.resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.Resampling.BICUBIC)
    rgb = np.asarray(rgb_img, dtype=np.float64) / 255.0
    hsv = np.asarray(rgb_img.convert("HSV"), dtype=np.float64) / 255.0
    luma = np.asarray(rgb_img.convert("L"), dtype=np.float64) / 255.0
    hue, sat = hsv[..., 0], hsv[..., 1]

    # Hasler & Süsstrunk, "Measuring colourfulness in natural images" (SPIE 2003).
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    colourfulness = math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())

    # Each pixel puts weight `sat` on its hue bin and `1 - sat` on an achromatic bin, so the
    # entropy falls continuously to 0 as an image turns grey (faint random tints of a nearly
    # grey image would otherwise read as maximal hue spread).
    hist, _ = np.histogram(hue, bins=HUE_BINS, range=(0.0, 1.0), weights=sat)
    hist = np.append(hist, float((1.0 - sat).sum()))
    p = hist[hist > 0] / hist.sum()
    hue_entropy = float(-(p * np.log(p)).sum() / math.log(HUE_BINS + 1))

    lap = _conv3(luma, _LAPLACIAN)
    gx = _conv3(luma, _SOBEL_X)
    gy = _conv3(luma, _SOBEL_X.T)
    grad = np.hypot(gx, gy)

    n = ANALYSIS_SIZE
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2) / (n / 2)
    centre = luma[r < 0.5].mean()
    border = luma[r > 0.9].mean()

    feats = [
        sat.mean(),
        2.0 * sat.std(),
        2.0 * colourfulness,
        hue_entropy,
        luma.mean(),
        2.0 * luma.std(),
        float(((luma < 0.15) | (luma > 0.85)).mean()),
        6.0 * np.abs(lap).mean(),
        float((grad > EDGE_THRESHOLD).mean()),
        centre - border,
    ]
    return np.asarray(feats, dtype=np.float64)


def features(images: Iterable[ImageLike]) -> np.ndarray:
    """Feature matrix (n_images x n_features) of a set of images or image paths."""
    rows = [image_features(im) for im in images]
    if not rows:
        raise ValueError("no images to compute style features of")
    return np.stack(rows)


def _as_features(x: np.ndarray | Sequence[ImageLike]) -> np.ndarray:
    if isinstance(x, np.ndarray):
        if x.ndim != 2 or x.shape[1] != len(FEATURES):
            raise ValueError(f"expected a feature matrix (n, {len(FEATURES)}), got shape {x.shape}")
        return x
    return features(x)


def feature_contributions(a: np.ndarray | Sequence[ImageLike], b: np.ndarray | Sequence[ImageLike]) -> dict[str, float]:
    """Per-feature terms ``(μ_a − μ_b)² + (σ_a − σ_b)²`` of the set distance (to explain it)."""
    fa, fb = _as_features(a), _as_features(b)
    terms = (fa.mean(0) - fb.mean(0)) ** 2 + (fa.std(0) - fb.std(0)) ** 2
    return {name: float(t) for name, t in zip(FEATURES, terms, strict=True)}


def set_distance(a: np.ndarray | Sequence[ImageLike], b: np.ndarray | Sequence[ImageLike]) -> float:
    """Diagonal-Gaussian Fréchet distance between two image sets, RMS over features (see module doc)."""
    terms = feature_contributions(a, b)
    return float(math.sqrt(sum(terms.values()) / len(terms)))


# The same quantity under the name the validation reads best with.
style_distance = set_distance


def style_gain(adapter_distance: float, base_distance: float) -> float:
    """Relative drop of the distance to a style's references: ``1 − d_adapter / d_base``.

    1 means the adapter reproduces the references' statistics exactly, 0 no change over the
    base, negative further away than the base.
    """
    return float(1.0 - adapter_distance / max(base_distance, 1e-9))


def is_blank(img: ImageLike, min_std: float = BLANK_STD) -> bool:
    """True for an image with no content: NaN outputs decode to flat black, so std ≈ 0."""
    arr = np.asarray(_open(img), dtype=np.float64) / 255.0
    return bool(not np.isfinite(arr).all() or arr.std() < min_std)

