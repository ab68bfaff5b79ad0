"""Image loading and ingest: every file accepted or rejected with the right reason, no crash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from stunning.config import DataConfig
from stunning.data import DataError
from stunning.data.images import (
    ImageRejected,
    blur_score,
    decode_image,
    hash_distance,
    perceptual_hash,
    square_resize,
    to_rgb,
)
from stunning.data.ingest import ingest, read_manifest, write_ingest_reports
from tests.factories import blocks, encode, make_messy_raw

STYLES = ["impressionist", "noir"]


# --- images.py -------------------------------------------------------------------------


def test_exif_orientation_is_applied():
    # stored landscape, left half red / right half blue, tagged "rotate 90 clockwise"
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:, :30] = (255, 0, 0)
    arr[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    loaded = decode_image(encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif))
    assert (loaded.orig_width, loaded.orig_height) == (40, 60)
    out = np.asarray(square_resize(loaded.image, 32), dtype=int)
    assert out[2, 16, 0] > 200 and out[2, 16, 2] < 60  # top is red
    assert out[29, 16, 2] > 200 and out[29, 16, 0] < 60  # bottom is blue


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste((200, 0, 0, 255), (10, 10, 30, 30))
    out = np.asarray(decode_image(encode(rgba, "PNG")).image)
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[20, 20]) == (200, 0, 0)
    la = Image.new("LA", (8, 8), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 16-bit mid grey
    assert decode_image(encode(deep, "PNG")).image.getpixel((0, 0)) == (128, 128, 128)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    assert to_rgb(pal).getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"definitely not an image", "undecodable"),
        (b"", "undecodable"),
        (encode(blocks(0), "PNG")[:300], "truncated"),
        (encode(blocks(0), "JPEG")[:400], "truncated"),
        (encode(blocks(0), "WEBP")[:200], "truncated"),
    ],
)
def test_decode_errors_are_typed(data, reason):
    with pytest.raises(ImageRejected) as err:
        decode_image(data)
    assert err.value.reason == reason


def test_square_resize_centre_crops_the_shorter_side():
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, :20] = 255  # a white band only in the left quarter, cropped away
    out = square_resize(Image.fromarray(arr), 32)
    assert out.size == (32, 32) and np.asarray(out).max() < 30


def test_blur_score_and_phash():
    sharp = blocks(1)
    blurred = sharp.filter(ImageFilter.GaussianBlur(6))
    assert blur_score(sharp) > 50 * blur_score(blurred)
    assert blur_score(Image.new("RGB", (32, 32), (90, 90, 90))) == 0.0
    h = perceptual_hash(sharp)
    assert len(h) == 16 and int(h, 16) >= 0
    brighter = Image.fromarray(np.clip(np.asarray(sharp, dtype=int) + 3, 0, 255).astype(np.uint8))
    assert hash_distance(h, perceptual_hash(brighter)) <= 2
    assert hash_distance(h, perceptual_hash(blocks(2))) > 10


# --- ingest.py -------------------------------------------------------------------------


@pytest.fixture()
def raw(tmp_path) -> Path:
    return make_messy_raw(tmp_path)


EXPECTED_REJECTIONS = {
    "impressionist/.hidden.png": "hidden_file",
    "impressionist/corrupt.png": "undecodable",
    "impressionist/truncated.png": "truncated",
    "impressionist/not_image.jpg": "undecodable",
    "impressionist/no_caption.png": "no_caption",
    "impressionist/blank.png": "empty_caption",
    "impressionist/tiny.png": "too_small",
    "impressionist/good_copy.png": "duplicate_file",
    "impressionist/scan.bmp": "unsupported_extension",
    "impressionist/gone.png": "unreadable",
    "noir/latin1.png": "unreadable_caption",
}
EXPECTED_ACCEPTED = {
    "impressionist/good.png",
    "impressionist/rotated.jpg",
    "impressionist/alpha.png",
    "impressionist/photo.WEBP",
    "impressionist/from_meta.png",
    "noir/sub/nested.png",
}


def test_ingest_accepts_and_rejects_exactly(raw, tmp_path):
    out = tmp_path / "ingested"
    report = ingest(raw, out, DataConfig(raw_dir=str(raw)))
    got = {r.file: r.reason for r in report.rejections}
    assert got == EXPECTED_REJECTIONS
    records = read_manifest(out)
    assert {r["source"] for r in records} == EXPECTED_ACCEPTED
    assert report.accepted == len(EXPECTED_ACCEPTED) and report.rejected == len(EXPECTED_REJECTIONS)
    assert report.by_style() == {"impressionist": {"accepted": 5, "rejected": 10}, "noir": {"accepted": 1, "rejected": 1}}
    warnings = {(w.file, w.reason) for w in report.warnings}
    assert ("impressionist/orphan.txt", "orphan_caption") in warnings
    assert ("impressionist/metadata.jsonl:2", "bad_metadata_line") in warnings
    assert ("impressionist/metadata.jsonl", "missing_file") in warnings

    by_source = {r["source"]: r for r in records}
    for src, rec in by_source.items():
        data = (raw / src).read_bytes()
        assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["id"] == rec["sha256"][:16]
        assert rec["path"] == f"images/{rec['style']}/{rec['id']}.png"
        with Image.open(out / rec["path"]) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
        assert (rec["width"], rec["height"]) == (32, 32)
        assert len(rec["phash"]) == 16
    assert by_source["impressionist/from_meta.png"]["caption"] == "a caption from metadata"
    assert by_source["impressionist/rotated.jpg"][("orig_width")] == 40
    assert by_source["noir/sub/nested.png"]["orig_width"] == 64
    rotated = np.asarray(Image.open(out / by_source["impressionist/rotated.jpg"]["path"]), dtype=int)
    assert rotated[2, 16, 0] > 200 and rotated[29, 16, 2] > 200  # upright: red top, blue bottom
    alpha = np.asarray(Image.open(out / by_source["impressionist/alpha.png"]["path"]))
    assert tuple(alpha[0, 0]) == (255, 255, 255)

    json_path, md_path = tmp_path / "reports/ingest.json", tmp_path / "reports/ingest.md"
    write_ingest_reports(report, json_path, md_path)
    data = json.loads(json_path.read_text())
    assert data["accepted"] == 6 and data["rejected"] == 11 and len(data["rejections"]) == 11
    assert set(data["rejections"][0]) == {"file", "reason", "detail"}
    md = md_path.read_text()
    for file, reason in EXPECTED_REJECTIONS.items():
        assert f"`{file}` | {reason}" in md


def test_ingest_is_deterministic(raw, tmp_path):
    cfg = DataConfig(raw_dir=str(raw))
    ingest(raw, tmp_path / "one", cfg)
    ingest(raw, tmp_path / "two", cfg)
    assert (tmp_path / "one/manifest.jsonl").read_bytes() == (tmp_path / "two/manifest.jsonl").read_bytes()
    first = sorted(p.name for p in (tmp_path / "one/images").rglob("*.png"))
    assert first == sorted(p.name for p in (tmp_path / "two/images").rglob("*.png"))


def test_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="sample_data"):
        ingest(tmp_path / "nowhere", tmp_path / "out", DataConfig())
    (tmp_path / "raw/impressionist").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        ingest(tmp_path / "raw", tmp_path / "out", DataConfig())
    assert str(tmp_path / "raw/noir") in str(err.value) and "data.styles" in str(err.value)
    assert not (tmp_path / "out").exists()
