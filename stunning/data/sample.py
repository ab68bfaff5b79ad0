"""The embedded sample dataset: small procedural fashion photos in two painting styles.

The pipeline has to run end to end with no downloads, so the sample set is drawn here
from ``data.sample_seed`` with numpy + Pillow. Each *scene* (a garment or accessory in a
named colour, on a named background, in one of a few positions) is rendered twice:

* ``impressionist`` -- short broken-colour strokes and dabs, saturated, jittered hues
  (even white and black garments get tinted shadows and highlights);
* ``noir`` -- high-contrast monochrome with film grain and a vignette.

So the two styles differ in saturation, contrast and colour histogram while the content
is shared, which is what a style LoRA should pick up. The generator also writes a few
deliberately bad files (documented in ``<out>/README.md``) so that the ingest and
curation reports have something real to say. Output is byte-for-byte deterministic.
"""

from __future__ import annotations

import colorsys
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from stunning.config import ConfigError, DataConfig
from stunning.data.images import hash_distance, perceptual_hash
from stunning.io import atomic_dir, atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

SAMPLE_STYLES: tuple[str, ...] = ("impressionist", "noir")
SIZE = 64  # larger than the default training resolution so resizing is exercised
GARMENTS: tuple[str, ...] = ("dress", "shirt", "trousers", "hat", "bag")
GARMENT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 35, 45),
    "blue": (40, 80, 190),
    "green": (40, 150, 70),
    "yellow": (235, 200, 40),
    "white": (245, 245, 240),
    "black": (25, 25, 30),
    "pink": (230, 130, 170),
    "orange": (235, 125, 35),
    "purple": (120, 60, 160),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 238, 232),
    "grey": (128, 128, 128),
    "black": (20, 20, 22),
    "beige": (220, 200, 170),
}
POSITIONS: dict[str, float] = {"centre": 0.5, "left": 0.32, "right": 0.68}
# Good images of one style are kept at least this far apart in perceptual-hash bits, so
# the sample survives near-duplicate filtering for any sensible threshold.
_MIN_HASH_DISTANCE = 8
_MAX_REDRAWS = 200

# Garment outlines in unit coordinates (x, y in [-0.5, 0.5], y down), scaled at render.
_POLYGONS: dict[str, list[list[tuple[float, float]]]] = {
    "dress": [[(-0.12, -0.5), (0.12, -0.5), (0.18, -0.12), (0.45, 0.5), (-0.45, 0.5), (-0.18, -0.12)]],
    "shirt": [
        [
            (-0.22, -0.45), (-0.06, -0.45), (0.0, -0.36), (0.06, -0.45), (0.22, -0.45), (0.5, -0.22),
            (0.4, -0.04), (0.25, -0.14), (0.25, 0.5), (-0.25, 0.5), (-0.25, -0.14), (-0.4, -0.04),
            (-0.5, -0.22),
        ]
    ],
    "trousers": [[(-0.3, -0.5), (0.3, -0.5), (0.36, 0.5), (0.08, 0.5), (0.0, -0.12), (-0.08, 0.5), (-0.36, 0.5)]],
    "hat": [[(-0.24, -0.32), (0.24, -0.32), (0.3, 0.08), (-0.3, 0.08)]],
    "bag": [[(-0.4, -0.08), (0.4, -0.08), (0.44, 0.45), (-0.44, 0.45)]],
}


@dataclass(frozen=True)
class Scene:
    """What is in a picture; rendered identically in content by every style."""

    garment: str
    colour: str
    background: str
    position: str
    dx: float  # small framing jitter, in pixels
    dy: float
    scale: float

    def caption(self, style: str) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        item = (
            f"a pair of {self.colour} {self.garment}"
            if self.garment == "trousers"
            else f"{article} {self.colour} {self.garment}"
        )
        where = "" if self.position == "centre" else f", on the {self.position}"
        return f"{item} on a {self.background} background{where}, {style} style"


def draw_scene(rng: np.random.Generator, index: int) -> Scene:
    """Draw one scene; garments cycle so every garment is equally represented."""
    garment = GARMENTS[index % len(GARMENTS)]
    background = str(rng.choice(list(BACKGROUNDS)))
    colours = [c for c in GARMENT_COLOURS if c != background]
    return Scene(
        garment=garment,
        colour=str(rng.choice(colours)),
        background=background,
        position=str(rng.choice(list(POSITIONS))),
        dx=float(rng.uniform(-3, 3)),
        dy=float(rng.uniform(-3, 3)),
        scale=float(rng.uniform(0.85, 1.15)),
    )


def _garment_mask(scene: Scene) -> np.ndarray:
    """Anti-aliased garment coverage in [0, 1], drawn at 4x and downsampled."""
    ss = 4
    big = SIZE * ss
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    extent = 0.58 * big * scene.scale
    cx = POSITIONS[scene.position] * big + scene.dx * ss
    cy = 0.52 * big + scene.dy * ss

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (cx + x * extent, cy + y * extent)

    for poly in _POLYGONS[scene.garment]:
        draw.polygon([to_px(x, y) for x, y in poly], fill=255)
    if scene.garment == "hat":
        draw.ellipse([to_px(-0.5, 0.0), to_px(0.5, 0.2)], fill=255)
    elif scene.garment == "bag":
        draw.arc([to_px(-0.25, -0.42), to_px(0.25, 0.22)], start=180, end=360, fill=255, width=int(0.05 * extent))
    elif scene.garment == "dress":
        # straps
        draw.line([to_px(-0.12, -0.5), to_px(-0.08, -0.62)], fill=255, width=int(0.03 * extent))
        draw.line([to_px(0.12, -0.5), to_px(0.08, -0.62)], fill=255, width=int(0.03 * extent))
    small = mask.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def render_clean(scene: Scene) -> np.ndarray:
    """The style-free scene as float RGB in [0, 1]: lit background, shaded garment, shadow."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float64) / 255.0
    fg = np.array(GARMENT_COLOURS[scene.colour], dtype=np.float64) / 255.0
    # studio light from the top left: a gentle gradient keeps flat areas from being flat
    light = (1.08 - 0.16 * (0.6 * yy + 0.4 * xx))[..., None]
    mask = _garment_mask(scene)
    shadow = np.roll(np.roll(mask, 2, axis=0), 2, axis=1)
    img = bg * light * (1.0 - 0.25 * shadow[..., None])
    garment_shading = (1.1 - 0.25 * yy)[..., None]
    img = img * (1.0 - mask[..., None]) + (fg * garment_shading) * mask[..., None]
    return np.clip(img, 0.0, 1.0)


def render_impressionist(clean: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Broken colour: a grid of dabs, then short strokes, each a jittered, saturated sample."""
    # an underpainting (the softened scene) so gaps between strokes are never bare canvas
    under = np.clip(clean * 255.0 + rng.normal(0, 12, clean.shape), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(under, mode="RGB").filter(ImageFilter.GaussianBlur(radius=1.5))
    draw = ImageDraw.Draw(canvas)
    angle0 = rng.uniform(0, math.pi)

    def paint(x: float, y: float, length: float, width: int) -> None:
        r, g, b = clean[int(np.clip(y, 0, SIZE - 1)), int(np.clip(x, 0, SIZE - 1))]
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        if s < 0.12:
            # neutral tones get the painter's tinted shadows (violet/blue) and warm lights
            h = 0.68 + rng.normal(0, 0.03) if v < 0.55 else 0.1 + rng.normal(0, 0.03)
            s = rng.uniform(0.12, 0.3)
        else:
            h = h + rng.normal(0, 0.035)
            s = min(1.0, s * 1.35 + rng.uniform(0.0, 0.2))
        v = float(np.clip(v + rng.normal(0, 0.09), 0.08, 1.0))
        rgb = colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), v)
        a = angle0 + rng.normal(0, 0.45)
        dx, dy = math.cos(a) * length / 2, math.sin(a) * length / 2
        draw.line(
            [(x - dx, y - dy), (x + dx, y + dy)],
            fill=tuple(int(round(c * 255)) for c in rgb),
            width=width,
        )

    for gy in range(0, SIZE, 3):
        for gx in range(0, SIZE, 3):
            paint(gx + rng.uniform(0, 3), gy + rng.uniform(0, 3), rng.uniform(2, 4), 3)
    for _ in range(450):
        paint(rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(3, 6), int(rng.integers(1, 3)))
    return canvas


def render_noir(clean: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Hard-lit monochrome: luminance through a steep S-curve, vignette, film grain."""
    lum = clean @ np.array([0.299, 0.587, 0.114])
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    # a raking key light from the upper left makes the characteristic hard falloff
    lum = lum * (1.25 - 0.6 * (0.5 * xx + 0.5 * yy))
    curve = 1.0 / (1.0 + np.exp(-10.0 * (lum - 0.45)))
    lo, hi = 1.0 / (1.0 + math.exp(4.5)), 1.0 / (1.0 + math.exp(-5.5))
    lum = (curve - lo) / (hi - lo)
    r2 = (xx - 0.5) ** 2 + (yy - 0.5) ** 2
    lum = lum * (1.0 - 1.3 * r2)
    lum = lum + rng.normal(0.0, 0.06, lum.shape)
    grey = np.clip(np.round(lum * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")


def render(scene: Scene, style: str, rng: np.random.Generator) -> Image.Image:
    clean = render_clean(scene)
    if style == "impressionist":
        return render_impressionist(clean, rng)
    if style == "noir":
        return render_noir(clean, rng)
    raise ValueError(f"unknown sample style {style!r}; the embedded sample has {list(SAMPLE_STYLES)}")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sample_styles(cfg: DataConfig) -> list[str]:
    """Styles the sample is generated for; a style the sample lacks is a config error.

    With ``data.source: local`` the sample is not used for training, so it is still
    generated (cheap, keeps the DVC output declared) for the two built-in styles.
    """
    if cfg.source == "local":
        return list(SAMPLE_STYLES)
    unknown = [s for s in cfg.styles if s not in SAMPLE_STYLES]
    if unknown:
        raise ConfigError(
            f"params.yaml data.styles: {unknown} not in the embedded sample, which only has "
            f"{list(SAMPLE_STYLES)}. To train on your own photos set data.source: local and put "
            f"them in data.raw_dir/<style>/ (image + same-name .txt caption)."
        )
    return list(cfg.styles)


@dataclass(frozen=True)
class SampleSummary:
    out_dir: Path
    styles: list[str]
    good_per_style: int
    bad_files: list[str]  # "<style>/<name>" paths relative to out_dir
    used_for_training: bool


def _draw_distinct_scenes(cfg: DataConfig, styles: list[str]) -> list[tuple[Scene, dict[str, Image.Image]]]:
    """Draw scenes (and their renders) whose perceptual hashes are far apart in every style."""
    rng = np.random.default_rng([cfg.sample_seed, 0])
    accepted: list[tuple[Scene, dict[str, Image.Image]]] = []
    hashes: dict[str, list[str]] = {s: [] for s in styles}
    for i in range(cfg.sample_images_per_style):
        for attempt in range(_MAX_REDRAWS):
            scene = draw_scene(rng, i)
            renders = {
                s: render(scene, s, np.random.default_rng([cfg.sample_seed, 1 + k, i, attempt]))
                for k, s in enumerate(SAMPLE_STYLES)
                if s in styles
            }
            # hashed at the sample's own size so the sample does not depend on data.resolution
            phashes = {s: perceptual_hash(img) for s, img in renders.items()}
            if all(
                hash_distance(phashes[s], other) >= _MIN_HASH_DISTANCE for s in styles for other in hashes[s]
            ):
                break
        else:
            logger.warning("sample image %d: no scene far from the others after %d draws", i, _MAX_REDRAWS)
        for s in styles:
            hashes[s].append(phashes[s])
        accepted.append((scene, renders))
    return accepted


def generate_sample(out_dir: Path, cfg: DataConfig) -> SampleSummary:
    """Write the sample set to ``out_dir`` (replaced atomically) and return what was written.

    Layout: ``<out>/<style>/look_NNN.png`` + ``look_NNN.txt`` (the same NNN is the same
    scene in every style), a few ``bad_*`` files, and ``<out>/README.md``.
    """
    out_dir = Path(out_dir)
    styles = sample_styles(cfg)
    if cfg.sample_images_per_style < 1:
        raise ConfigError(
            f"params.yaml data.sample_images_per_style={cfg.sample_images_per_style}: must be at least 1."
        )
    scenes = _draw_distinct_scenes(cfg, styles)
    extra_rng = np.random.default_rng([cfg.sample_seed, 99])
    bad: list[str] = []
    with atomic_dir(out_dir) as tmp:
        for style in styles:
            (tmp / style).mkdir()
            for i, (scene, renders) in enumerate(scenes):
                name = f"look_{i:03d}"
                atomic_write_bytes(tmp / style / f"{name}.png", _png(renders[style]))
                atomic_write_text(tmp / style / f"{name}.txt", scene.caption(style) + "\n")
        bad += _write_bad_files(tmp, styles, scenes, extra_rng, cfg)
        atomic_write_text(tmp / "README.md", _readme(cfg, styles, bad))
    logger.info("sample set: %d styles x %d images -> %s", len(styles), len(scenes), out_dir)
    return SampleSummary(out_dir, styles, len(scenes), bad, used_for_training=cfg.source == "embedded")


# What each deliberately bad file is and what the pipeline should do with it.
BAD_FILES: dict[str, tuple[str, str]] = {
    "bad_truncated.png": ("a PNG cut off half-way", "rejected by ingest: truncated"),
    "bad_tiny.png": ("an 8x8 image", "rejected by ingest: too_small"),
    "bad_not_an_image.jpg": ("a text file named .jpg", "rejected by ingest: undecodable"),
    "bad_no_caption.png": ("a valid image without a caption", "rejected by ingest: no_caption"),
    "bad_blurry.png": ("a heavily blurred image", "dropped by curate: blurry"),
    "bad_near_duplicate.png": (
        "look_000 slightly brightened and re-saved (different bytes, same picture)",
        "dropped by curate: near_duplicate (of look_000, whichever id sorts second)",
    ),
    "bad_short_caption.png": ("a valid image captioned with one word", "dropped by curate: short_caption"),
}
# Spread over the styles so each folder has something wrong with it.
_BAD_LAYOUT: dict[str, list[str]] = {
    "impressionist": ["bad_truncated.png", "bad_tiny.png", "bad_blurry.png"],
    "noir": ["bad_not_an_image.jpg", "bad_no_caption.png", "bad_near_duplicate.png", "bad_short_caption.png"],
}


def _write_bad_files(
    tmp: Path,
    styles: list[str],
    scenes: list[tuple[Scene, dict[str, Image.Image]]],
    rng: np.random.Generator,
    cfg: DataConfig,
) -> list[str]:
    written: list[str] = []
    for style in styles:
        folder = tmp / style
        for name in _BAD_LAYOUT[style]:
            scene = draw_scene(rng, int(rng.integers(0, len(GARMENTS))))
            img = render(scene, style, rng)
            caption: str | None = scene.caption(style)
            if name == "bad_truncated.png":
                data = _png(img)
                data = data[: len(data) // 2]
            elif name == "bad_tiny.png":
                data = _png(img.resize((8, 8), Image.Resampling.LANCZOS))
            elif name == "bad_not_an_image.jpg":
                data = b"This is a text file that someone renamed to .jpg; it is not an image.\n"
            elif name == "bad_no_caption.png":
                data, caption = _png(img), None
            elif name == "bad_blurry.png":
                data = _png(img.filter(ImageFilter.GaussianBlur(radius=10)))
            elif name == "bad_near_duplicate.png":
                # a slightly brightened re-export: different bytes, the same picture
                original_scene, renders = scenes[0]
                pixels = np.asarray(renders[style], dtype=np.int16) + 3
                data = _png(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB"))
                caption = original_scene.caption(style)
            elif name == "bad_short_caption.png":
                data, caption = _png(img), scene.garment
            else:  # pragma: no cover - _BAD_LAYOUT and this function must agree
                raise AssertionError(name)
            atomic_write_bytes(folder / name, data)
            if caption is not None:
                atomic_write_text(folder / f"{Path(name).stem}.txt", caption + "\n")
            written.append(f"{style}/{name}")
    return written


def _readme(cfg: DataConfig, styles: list[str], bad: list[str]) -> str:
    lines = [
        "# Embedded sample dataset",
        "",
        "Generated by `python -m stages.sample_data` (`stunning.data.sample`) from "
        f"`data.sample_seed={cfg.sample_seed}`; do not edit, it is rebuilt by the pipeline.",
        "",
    ]
    if cfg.source == "local":
        lines += [
            f"**Unused:** `data.source` is `local`, so training reads your photos from "
            f"`{cfg.raw_dir}` and this folder is only kept as the declared pipeline output.",
            "",
        ]
    lines += [
        f"- styles: {', '.join(styles)}",
        f"- {cfg.sample_images_per_style} good images per style, {SIZE}x{SIZE} PNG, named "
        "`look_NNN.png` with a same-name `.txt` caption; the same NNN is the same scene "
        "(garment, colour, background, position) in every style.",
        "- impressionist: short broken-colour strokes, saturated, jittered hues.",
        "- noir: high-contrast monochrome, film grain, vignette.",
        "",
        "## Deliberately bad files",
        "",
        "They are here so that the ingest and curation reports show real rejections.",
        "",
        "| file | what it is | expected outcome |",
        "|---|---|---|",
    ]
    for path in bad:
        what, outcome = BAD_FILES[Path(path).name]
        lines.append(f"| `{path}` | {what} | {outcome} |")
    return "\n".join(lines) + "\n"
