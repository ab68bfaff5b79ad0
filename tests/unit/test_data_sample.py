"""The embedded sample set: deterministic, two clearly different styles, documented bad files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stunning.config import ConfigError, DataConfig
from stunning.data.sample import BAD_FILES, SAMPLE_STYLES, generate_sample

CAPTION = re.compile(
    r"^(an? \w+ (dress|shirt|hat|bag)|a pair of \w+ trousers) on a \w+ background"
    r"(, on the (left|right))?, (impressionist|noir) style$"
)


def _cfg(**kw) -> DataConfig:
    return DataConfig(sample_images_per_style=kw.pop("n", 8), **kw)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "data"
    generate_sample(out, _cfg())
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_byte_for_byte_deterministic(sample, tmp_path):
    again = tmp_path / "again"
    generate_sample(again, _cfg())
    assert _files(again) == _files(sample)
    other = tmp_path / "other"
    generate_sample(other, _cfg(sample_seed=1))
    assert _files(other)["noir/look_000.png"] != _files(sample)["noir/look_000.png"]


def test_layout_sizes_and_captions(sample):
    for style in SAMPLE_STYLES:
        looks = sorted((sample / style).glob("look_*.png"))
        assert len(looks) == 8
        for png in looks:
            with Image.open(png) as img:
                assert img.size == (64, 64)  # larger than data.resolution, so ingest resizes
            caption = png.with_suffix(".txt").read_text().strip()
            assert CAPTION.match(caption), caption
            assert caption.endswith(f"{style} style")
    # the same look number is the same scene in both styles
    for i in range(8):
        captions = [(sample / s / f"look_{i:03d}.txt").read_text().split(",")[0] for s in SAMPLE_STYLES]
        assert captions[0] == captions[1]


def _style_stats(folder: Path) -> tuple[float, float]:
    """Mean HSV saturation (0-1) and mean luminance spread (p95 - p5, 0-255) of a style's looks."""
    sats, spreads = [], []
    for png in sorted(folder.glob("look_*.png")):
        with Image.open(png) as img:
            rgb = img.convert("RGB")
        sats.append(np.asarray(rgb.convert("HSV"), dtype=float)[..., 1].mean() / 255)
        lum = np.asarray(rgb, dtype=float) @ [0.299, 0.587, 0.114]
        spreads.append(np.percentile(lum, 95) - np.percentile(lum, 5))
    return float(np.mean(sats)), float(np.mean(spreads))


def test_styles_are_statistically_distinct(sample):
    imp_sat, imp_spread = _style_stats(sample / "impressionist")
    noir_sat, noir_spread = _style_stats(sample / "noir")
    assert imp_sat > 0.2, imp_sat  # saturated broken colour
    assert noir_sat < 0.01, noir_sat  # monochrome
    assert noir_spread > imp_spread + 15, (noir_spread, imp_spread)  # hard contrast
    # colour histograms: noir has all its mass on the grey diagonal, impressionist does not
    with Image.open(sample / "noir/look_001.png") as img:
        a = np.asarray(img.convert("RGB"), dtype=int)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    with Image.open(sample / "impressionist/look_001.png") as img:
        a = np.asarray(img.convert("RGB"), dtype=int)
    assert np.abs(a - a.mean(-1, keepdims=True)).mean() > 5


def test_bad_files_are_written_and_documented(sample):
    readme = (sample / "README.md").read_text()
    bad = sorted(p.relative_to(sample).as_posix() for p in sample.rglob("bad_*") if p.suffix != ".txt")
    assert len(bad) == len(BAD_FILES)
    for path in bad:
        assert path in readme
    with pytest.raises(OSError):
        with Image.open(sample / "impressionist/bad_truncated.png") as img:
            img.load()
    with Image.open(sample / "impressionist/bad_tiny.png") as img:
        assert img.size == (8, 8)
    assert not (sample / "noir/bad_no_caption.txt").exists()
    assert (sample / "noir/bad_short_caption.txt").read_text().split() != []
    assert len((sample / "noir/bad_short_caption.txt").read_text().split()) == 1


def test_unknown_style_is_a_clear_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        generate_sample(tmp_path / "s", _cfg(styles=["watercolor"]))
    msg = str(err.value)
    assert "watercolor" in msg and "impressionist" in msg and "data.source: local" in msg
    assert not (tmp_path / "s").exists()


def test_local_source_still_writes_the_sample_and_says_it_is_unused(tmp_path):
    out = tmp_path / "s"
    summary = generate_sample(out, _cfg(n=2, source="local", styles=["watercolor"]))
    assert summary.styles == list(SAMPLE_STYLES) and not summary.used_for_training
    assert "Unused" in (out / "README.md").read_text()


def test_bad_files_get_the_outcome_the_readme_promises(sample, tmp_path):
    from stunning.config import CurateConfig
    from stunning.data.curate import curate
    from stunning.data.ingest import ingest

    cfg = _cfg()
    report = ingest(sample, tmp_path / "ingested", cfg)
    result = curate(tmp_path / "ingested", tmp_path / "curated", cfg, CurateConfig(), validate=False)
    outcomes = {r.file: f"rejected by ingest: {r.reason}" for r in report.rejections}
    outcomes |= {d.source: f"dropped by curate: {d.reason}" for d in result.drops}
    # the near-duplicate pair loses whichever of the two has the larger id
    pair = {"noir/look_000.png", "noir/bad_near_duplicate.png"}
    dropped_twin = (pair & set(outcomes)).pop()
    outcomes["noir/bad_near_duplicate.png"] = outcomes.pop(dropped_twin)
    expected = {f"{s}/{name}": BAD_FILES[name][1].split(" (")[0] for s in SAMPLE_STYLES for name in BAD_FILES
                if (sample / s / name).exists()}
    assert outcomes == expected
    assert result.stats["kept"] == 2 * 8  # every good look survives curation
