"""Style features and set distance separate the two sample styles and a plain base."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from stunning.metrics import (
    FEATURES,
    feature_contributions,
    features,
    image_features,
    is_blank,
    set_distance,
    style_gain,
)

N = 8
SIZE = 32


def impressionist(rng: np.random.Generator) -> Image.Image:
    """Saturated broken colour: jittered-hue dabs over a coloured underpainting."""
    hue = rng.uniform()
    img = Image.new("RGB", (SIZE, SIZE), tuple(int(c * 255) for c in colorsys.hsv_to_rgb(hue, 0.5, 0.8)))
    draw = ImageDraw.Draw(img)
    for _ in range(120):
        x, y = rng.uniform(0, SIZE, 2)
        h = (hue + rng.normal(0, 0.15)) % 1.0
        rgb = colorsys.hsv_to_rgb(h, rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0))
        draw.line([(x, y), (x + rng.uniform(-3, 3), y + rng.uniform(-3, 3))], fill=tuple(int(c * 255) for c in rgb), width=2)
    return img


def noir(rng: np.random.Generator) -> Image.Image:
    """High-contrast monochrome: a hard-lit shape through an S-curve, grain and a vignette."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    cx, cy = rng.uniform(0.3, 0.7, 2)
    lum = 0.3 + 0.5 * ((np.abs(xx - cx) < 0.2) & (np.abs(yy - cy) < 0.3)) + 0.2 * (1 - xx)
    lum = 1 / (1 + np.exp(-12 * (lum - 0.5)))
    lum = lum * (1 - 0.8 * np.hypot(xx - 0.5, yy - 0.5) ** 2) + rng.normal(0, 0.08, lum.shape)
    g = (np.clip(lum, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(np.stack([g] * 3, axis=-1), mode="RGB")


def plain(rng: np.random.Generator) -> Image.Image:
    """A smooth, muted base-model-like picture."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    c = rng.uniform(0.3, 0.7, 3)
    img = c[None, None, :] * (0.8 + 0.2 * xx[..., None]) + 0.05 * yy[..., None]
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), mode="RGB")


def make(kind, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return features([kind(rng) for _ in range(N)])


@pytest.fixture(scope="module")
def sets() -> dict[str, np.ndarray]:
    return {
        "imp_gen": make(impressionist, 1),
        "imp_ref": make(impressionist, 2),
        "noir_gen": make(noir, 3),
        "noir_ref": make(noir, 4),
        "base": make(plain, 5),
    }


def test_feature_vector_shape_and_ranges():
    f = image_features(noir(np.random.default_rng(0)))
    assert f.shape == (len(FEATURES),) and np.isfinite(f).all()
    named = dict(zip(FEATURES, f, strict=True))
    # monochrome: no saturation, no hue spread; a vignette darkens the border
    assert named["saturation_mean"] == 0 and named["hue_entropy"] == 0
    assert named["vignette"] > 0
    c = dict(zip(FEATURES, image_features(impressionist(np.random.default_rng(0))), strict=True))
    assert c["saturation_mean"] > 0.4 and c["colourfulness"] > 0.3 and c["hue_entropy"] > 0.3


def test_distance_separates_noir_from_impressionist(sets):
    own_noir = set_distance(sets["noir_gen"], sets["noir_ref"])
    own_imp = set_distance(sets["imp_gen"], sets["imp_ref"])
    cross_noir = set_distance(sets["noir_gen"], sets["imp_ref"])
    cross_imp = set_distance(sets["imp_gen"], sets["noir_ref"])
    assert own_noir < 0.5 * cross_noir
    assert own_imp < 0.5 * cross_imp
    # and the base is told apart from both styles
    assert set_distance(sets["base"], sets["noir_ref"]) > 2 * own_noir
    assert set_distance(sets["base"], sets["imp_ref"]) > 2 * own_imp


def test_distance_is_a_symmetric_metric_on_sets(sets):
    a, b = sets["noir_gen"], sets["imp_ref"]
    assert set_distance(a, a) == 0
    assert set_distance(a, b) == pytest.approx(set_distance(b, a))
    assert set_distance(a, b) <= set_distance(a, sets["base"]) + set_distance(sets["base"], b) + 1e-12
    contrib = feature_contributions(a, b)
    assert set(contrib) == set(FEATURES)
    colour = sum(contrib[k] for k in ("saturation_mean", "saturation_std", "colourfulness", "hue_entropy"))
    assert colour > 0.5 * sum(contrib.values())  # colour vs monochrome is what separates these


def test_distance_accepts_images_and_paths(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [noir(rng) for _ in range(3)]
    paths = []
    for i, im in enumerate(imgs):
        im.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    assert set_distance(imgs, paths) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="no images"):
        features([])


def test_style_gain_is_relative_drop():
    assert style_gain(0.5, 1.0) == pytest.approx(0.5)
    assert style_gain(1.0, 1.0) == 0
    assert style_gain(2.0, 1.0) < 0


def test_blank_detection():
    assert is_blank(Image.new("RGB", (8, 8), (0, 0, 0)))
    assert not is_blank(noir(np.random.default_rng(0)))


def test_hue_entropy_falls_continuously_to_zero_as_an_image_turns_grey():
    """Faint random tints on a grey image are not 'broken colour' (an achromatic bin absorbs them)."""
    rng = np.random.default_rng(0)
    grey = np.full((32, 32, 3), 0.5)
    faint = np.clip(grey + rng.normal(0, 0.01, grey.shape), 0, 1)
    strokes = rng.uniform(0, 1, (32, 32, 3))

    def entropy(a):
        return features([Image.fromarray((a * 255).astype(np.uint8))])[0][FEATURES.index("hue_entropy")]

    assert entropy(grey) == pytest.approx(0.0, abs=1e-9)
    assert entropy(faint) < 0.25 < 0.6 < entropy(strokes)
