"""The analytic oracle reads the sample world's images exactly enough to score prompt adherence."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from stunning.data.oracle import ATTRIBUTES, Reading, adherence, parse_caption, read_image, read_images
from stunning.data.sample import BACKGROUNDS, GARMENT_COLOURS, GARMENTS, POSITIONS, Scene, draw_scene, render_clean

N_SCENES = 300


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(123)
    return [draw_scene(rng, i) for i in range(N_SCENES)]


@pytest.fixture(scope="module")
def renders_64(scenes) -> list[Image.Image]:
    return [Image.fromarray(np.round(render_clean(s) * 255.0).astype(np.uint8), mode="RGB") for s in scenes]


@pytest.fixture(scope="module")
def renders_32(renders_64) -> list[Image.Image]:
    return [im.resize((32, 32), Image.Resampling.LANCZOS) for im in renders_64]


def _accuracy(scenes: list[Scene], readings: list[Reading]) -> dict[str, float]:
    return {
        a: float(np.mean([getattr(r, a) == getattr(s, a) for r, s in zip(readings, scenes, strict=True)]))
        for a in ATTRIBUTES
    }


# Measured when written: 1.0 on every attribute at 16, 32, 64 and 128 px, clean and noisy.
FLOORS = {"colour": 0.97, "background": 0.97, "position": 0.9, "garment": 0.85}


@pytest.mark.parametrize("size", [32, 64])
def test_reads_clean_renders(scenes, renders_64, renders_32, size):
    images = renders_32 if size == 32 else renders_64
    acc = _accuracy(scenes, [read_image(im) for im in images])
    assert all(acc[a] >= FLOORS[a] for a in ATTRIBUTES), acc


@pytest.mark.parametrize("size", [16, 128])
def test_reads_other_square_sizes(scenes, renders_64, size):
    images = [im.resize((size, size), Image.Resampling.LANCZOS) for im in renders_64[:100]]
    acc = _accuracy(scenes[:100], read_images(images))
    assert all(acc[a] >= FLOORS[a] for a in ATTRIBUTES), acc


def test_reads_noisy_blurred_renders(scenes, renders_32):
    rng = np.random.default_rng(0)
    noisy = []
    for im in renders_32:
        pixels = np.asarray(im, dtype=np.float64) / 255.0 + rng.normal(0.0, 0.04, (32, 32, 3))
        grainy = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255.0).astype(np.uint8), mode="RGB")
        noisy.append(grainy.filter(ImageFilter.GaussianBlur(radius=0.7)))
    acc = _accuracy(scenes, read_images(noisy))
    assert acc["colour"] >= 0.93 and acc["background"] >= 0.93, acc
    assert acc["garment"] >= 0.8 and acc["position"] >= 0.85, acc


def test_accepts_arrays_and_images_alike(scenes, renders_64):
    im = renders_64[0]
    as_pil = read_image(im)
    assert read_image(np.asarray(im)) == as_pil
    assert read_image(np.asarray(im, dtype=np.float64) / 255.0) == as_pil
    assert read_image(im.convert("RGBA")) == as_pil
    assert 0.03 < as_pil.foreground_fraction < 0.45
    assert (as_pil.colour, as_pil.garment) == (scenes[0].colour, scenes[0].garment)


def test_rejects_unreadable_inputs():
    with pytest.raises(ValueError, match="square"):
        read_image(Image.new("RGB", (64, 32)))
    with pytest.raises(ValueError, match="square"):
        read_image(Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError, match="shape"):
        read_image(np.zeros((32, 32, 2)))


def test_blank_and_noise_images_give_no_garment_reading():
    grey = read_image(Image.new("RGB", (32, 32), BACKGROUNDS["grey"]))
    assert (grey.colour, grey.garment, grey.position) == (None, None, None)
    assert grey.background == "grey" and grey.foreground_fraction < 0.03
    wash = read_image(Image.new("RGB", (64, 64), GARMENT_COLOURS["red"]))
    assert (wash.colour, wash.garment, wash.position) == (None, None, None)
    rng = np.random.default_rng(1)
    for size in (32, 64):
        noise = read_image(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        assert (noise.colour, noise.garment, noise.position) == (None, None, None), noise


def test_adherence_scores_match_and_mismatch(scenes, renders_32):
    images, chosen = renders_32[:40], scenes[:40]
    right = [s.caption("noir") for s in chosen]
    assert adherence(images, right) == {"colour": 1.0, "background": 1.0, "garment": 1.0, "position": 1.0, "n": 40}

    def other(value: str, table) -> str:
        return next(v for v in table if v != value)

    wrong_colour = [
        s.caption("noir").replace(f" {s.colour} ", f" {other(s.colour, GARMENT_COLOURS)} ", 1) for s in chosen
    ]
    scores = adherence(images, wrong_colour)
    assert scores["colour"] == 0.0 and scores["garment"] == scores["background"] == scores["position"] == 1.0
    wrong_background = [
        s.caption("noir").replace(f"on a {s.background} ", f"on a {other(s.background, BACKGROUNDS)} ") for s in chosen
    ]
    assert adherence(images, wrong_background)["background"] == 0.0
    blank = [Image.new("RGB", (32, 32), BACKGROUNDS["white"])] * 3
    assert adherence(blank, [scenes[0].caption("noir")] * 3)["colour"] == 0.0
    assert adherence([], []) == {"colour": 0.0, "background": 0.0, "garment": 0.0, "position": 0.0, "n": 0}
    with pytest.raises(ValueError, match="one prompt per image"):
        adherence(images, right[:-1])
    with pytest.raises(ValueError, match="a purple cat"):
        adherence(images[:1], ["a purple cat"])


def test_parse_caption_round_trips_the_grammar():
    for garment, colour, background, position in itertools.product(GARMENTS, GARMENT_COLOURS, BACKGROUNDS, POSITIONS):
        scene = Scene(garment, colour, background, position, 0.0, 0.0, 1.0)
        want = {"colour": colour, "garment": garment, "background": background, "position": position}
        for style in ("noir", "impressionist"):
            caption = scene.caption(style)
            assert parse_caption(caption) == want, caption
            bare = caption.removesuffix(f", {style} style")
            assert bare != caption and parse_caption(bare) == want, bare
    assert parse_caption("A pair of Blue trousers on a grey background,  on the left") == {
        "colour": "blue",
        "garment": "trousers",
        "background": "grey",
        "position": "left",
    }


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "a red dress",
        "a red dress on a white background, on the top",
        "a magenta dress on a white background",
        "a red skirt on a white background",
        "a red dress on a tartan background",
        "a red trousers on a white background",
        "a pair of red dress on a white background",
        "a red dress on a white background, noir",
        "a red dress on a white background, noir style, again",
    ],
)
def test_parse_caption_rejects_malformed_captions(caption):
    with pytest.raises(ValueError) as err:
        parse_caption(caption)
    assert repr(caption) in str(err.value)
