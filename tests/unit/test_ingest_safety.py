"""Ingest safety: nothing outside data.raw_dir is read; duplicates kept by content, not name;
a corpus of corrupted images, captions and metadata.jsonl each rejected with a clear reason."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from stunning.config import CurateConfig, DataConfig
from stunning.data.curate import curate
from stunning.data.images import REMEDIES
from stunning.data.ingest import ingest, read_manifest
from tests.factories import blocks, encode, put

STYLES = ["impressionist", "noir"]
CFG = DataConfig(styles=STYLES)


def _raw(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    put(raw / "impressionist", "good.png", encode(blocks(1), "PNG"), "a good picture")
    put(raw / "noir", "good.png", encode(blocks(2), "PNG"), "a noir picture")
    return raw


def _run(raw: Path, out: Path, cfg: DataConfig = CFG):
    report = ingest(raw, out, cfg)
    return report, {r.file: r for r in report.rejections}, read_manifest(out)


# --- containment -----------------------------------------------------------------------


def test_symlinks_out_of_the_data_folder_are_rejected_and_never_read(tmp_path):
    raw = _raw(tmp_path)
    secret_dir = tmp_path / "private"
    secret = put(secret_dir, "secret.png", encode(blocks(50), "PNG"), "a private photo")
    (secret_dir / "meta").mkdir()
    (secret_dir / "meta/metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "t"}) + "\n")
    a = raw / "impressionist"
    (a / "leak.png").symlink_to(secret)  # image link out
    put(a, "own.png", encode(blocks(3), "PNG"), caption=None)
    (a / "own.txt").symlink_to(secret.with_suffix(".txt"))  # caption link out
    (a / "linked_dir").symlink_to(secret_dir)  # folder link out
    (a / "metadata.jsonl").symlink_to(secret_dir / "meta/metadata.jsonl")  # metadata link out
    (a / "inside.png").symlink_to(a / "good.png")  # link inside: fine (a duplicate of good.png)
    put(raw / "shared", "extra.png", encode(blocks(4), "PNG"), "a shared picture")
    (a / "sub").symlink_to(raw / "shared")  # folder link inside: followed

    report, rejected, records = _run(raw, tmp_path / "out")
    for rel, target in [
        ("impressionist/leak.png", secret),
        ("impressionist/linked_dir", secret_dir),
        ("impressionist/metadata.jsonl", secret_dir / "meta/metadata.jsonl"),
        ("impressionist/own.txt", secret.with_suffix(".txt")),
    ]:
        assert rejected[rel].reason == "outside_raw_dir"
        assert rejected[rel].detail == f"symlink points outside data.raw_dir: {target.resolve()}"
    assert rejected["impressionist/own.png"].reason == "outside_raw_dir"  # its caption leads out
    assert "own.txt" in rejected["impressionist/own.png"].detail
    assert rejected["impressionist/inside.png"].reason == "duplicate_file"
    assert "outside_raw_dir" in REMEDIES
    assert {r["source"] for r in records} == {"impressionist/good.png", "impressionist/sub/extra.png", "noir/good.png"}
    secret_sha = hashlib.sha256(secret.read_bytes()).hexdigest()
    assert all(r["sha256"] != secret_sha for r in records)
    assert len(list((tmp_path / "out/images").rglob("*.png"))) == 3
    md = report.to_markdown()
    assert "`impressionist/leak.png` | outside_raw_dir" in md


def test_a_style_folder_linked_outside_is_rejected_not_read(tmp_path):
    raw = _raw(tmp_path)
    outside = tmp_path / "elsewhere/noir"
    put(outside, "x.png", encode(blocks(9), "PNG"), "outside picture")
    import shutil

    shutil.rmtree(raw / "noir")
    (raw / "noir").symlink_to(outside)
    report, rejected, records = _run(raw, tmp_path / "out")
    assert rejected["noir"].reason == "outside_raw_dir"
    assert rejected["noir"].detail.startswith(f"symlink points outside data.raw_dir: {outside.resolve()}")
    assert {r["source"] for r in records} == {"impressionist/good.png"}
    assert report.by_style()["noir"] == {"accepted": 0, "rejected": 1}


def test_a_raw_dir_that_is_itself_a_link_is_fine(tmp_path):
    real = _raw(tmp_path)
    link = tmp_path / "raw_link"
    link.symlink_to(real)
    report, rejected, records = _run(link, tmp_path / "out")
    assert not rejected and len(records) == 2


# --- duplicates ------------------------------------------------------------------------


def _pair(seed: int) -> tuple[bytes, bytes]:
    """Two near-duplicate photos: a sharp, larger original and a softer, smaller one."""
    big = blocks(seed, (64, 64))
    small = big.resize((48, 48), Image.Resampling.LANCZOS).filter(ImageFilter.GaussianBlur(0.6))
    return encode(big, "PNG"), encode(small, "PNG")


@pytest.mark.parametrize("swap", [False, True])
def test_near_duplicates_keep_the_same_content_whatever_the_names(tmp_path, swap):
    big, small = _pair(7)
    raw = tmp_path / "raw"
    for style, seed in (("impressionist", 20), ("noir", 40)):
        for i in range(3):
            put(raw / style, f"other{i}.png", encode(blocks(seed + i), "PNG"), f"another picture {i} here")
    names = ("a.png", "z.png") if not swap else ("z.png", "a.png")
    put(raw / "impressionist", names[0], big, "the sharp original photo")
    put(raw / "impressionist", names[1], small, "the soft smaller copy")
    ingest(raw, tmp_path / "ing", CFG)
    result = curate(tmp_path / "ing", tmp_path / "cur", CFG, CurateConfig(min_resolution=30, min_images_per_style=1), validate=False)
    near = [d for d in result.drops if d.reason == "near_duplicate"]
    assert len(near) == 1
    assert near[0].source == f"impressionist/{names[1]}"  # the smaller one, under either name
    assert "larger original (64x64 vs 48x48)" in near[0].detail
    kept_captions = {r["caption"] for r in result.rows}
    assert "the sharp original photo" in kept_captions and "the soft smaller copy" not in kept_captions


def test_near_duplicates_of_equal_size_keep_the_sharper(tmp_path):
    sharp = blocks(11, (48, 48))
    soft = sharp.filter(ImageFilter.GaussianBlur(0.5))
    raw = tmp_path / "raw"
    for style in STYLES:
        put(raw / style, "b.png", encode(blocks(60 + len(style)), "PNG"), "a filler picture")
    put(raw / "impressionist", "a_soft.png", encode(soft, "PNG"), "soft version")
    put(raw / "impressionist", "z_sharp.png", encode(sharp, "PNG"), "sharp version")
    ingest(raw, tmp_path / "ing", CFG)
    cfg = CurateConfig(min_resolution=30, min_images_per_style=1, blur_threshold=0.0, near_duplicate_distance=12)
    result = curate(tmp_path / "ing", tmp_path / "cur", CFG, cfg, validate=False)
    near = [d for d in result.drops if d.reason == "near_duplicate"]
    assert [d.source for d in near] == ["impressionist/a_soft.png"] and "sharper" in near[0].detail


@pytest.mark.parametrize("swap", [False, True])
def test_exact_duplicates_keep_by_content_not_by_name(tmp_path, swap):
    data = encode(blocks(5), "PNG")
    raw = _raw(tmp_path)
    names = ("a.png", "b.png") if not swap else ("b.png", "a.png")
    put(raw / "impressionist", names[0], data, "zebra caption")
    put(raw / "impressionist", names[1], data, "apple caption")
    put(raw / "noir", "0first.png", data, "aardvark caption")  # same bytes in a later style
    report, rejected, records = _run(raw, tmp_path / "out")
    kept = [r for r in records if r["caption"].endswith(" caption")]
    assert len(kept) == 1 and kept[0]["caption"] == "apple caption" and kept[0]["style"] == "impressionist"
    assert kept[0]["source"] == f"impressionist/{names[1]}"
    dup = rejected[f"impressionist/{names[0]}"]
    assert dup.reason == "duplicate_file" and f"as impressionist/{names[1]}, which is kept" in dup.detail
    assert "sorts before" in dup.detail
    assert "comes before 'noir' in data.styles" in rejected["noir/0first.png"].detail


def test_exact_duplicate_without_a_caption_loses_to_one_with(tmp_path):
    data = encode(blocks(6), "PNG")
    raw = _raw(tmp_path)
    put(raw / "impressionist", "a.png", data, caption=None)
    put(raw / "impressionist", "b.png", data, "has a caption")
    _, rejected, records = _run(raw, tmp_path / "out")
    assert any(r["source"] == "impressionist/b.png" for r in records)
    assert "usable caption" in rejected["impressionist/a.png"].detail


# --- a corpus of corrupted files -------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _bomb() -> bytes:
    """A real 12000x12000 greyscale PNG (a few hundred KB of zeros compressed): 144 M pixels."""
    w = h = 12000
    row = b"\x00" + b"\x00" * w
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _mode(mode: str) -> bytes:
    rgb = blocks(30)
    if mode == "CMYK":
        return encode(rgb.convert("CMYK"), "JPEG", quality=95)
    if mode == "I;16":
        arr = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        return encode(Image.fromarray(arr), "PNG")  # uint16 -> mode I;16
    return encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")


REJECTED_CORPUS = {
    "zero.png": (b"", None, "undecodable"),
    "text.png": (b"just some text, not an image\n", None, "undecodable"),
    "cut.png": (encode(blocks(31), "PNG")[:120], None, "truncated"),
    "cut.jpg": (encode(blocks(32), "JPEG")[:300], None, "truncated"),
    "huge_header.png": (_png_header_only(60000, 60000), None, "too_large"),
    "bomb.png": (_bomb(), None, "too_large"),
    "scan.gif": (encode(blocks(33), "GIF"), None, "unsupported_extension"),
    "noext": (encode(blocks(34), "PNG"), None, "unsupported_extension"),
    "latin1.png": (encode(blocks(35), "PNG"), "caf\xe9".encode("latin-1"), "unreadable_caption"),
    "nul.png": (encode(blocks(36), "PNG"), b"a\x00b", "unreadable_caption"),
    "blank.png": (encode(blocks(37), "PNG"), b" \t\r\n ", "empty_caption"),
    "bomcut.png": (encode(blocks(38), "PNG"), b"\xff\xfea\x00b", "unreadable_caption"),
    "hugecap.png": (encode(blocks(39), "PNG"), b"word " * 300_000, "unreadable_caption"),
}
ACCEPTED_CORPUS = {
    "cmyk.jpg": (_mode("CMYK"), b"a cmyk photo"),
    "sixteen.png": (_mode("I;16"), b"a 16-bit scan"),
    "palette.png": (_mode("P"), b"a palette picture"),
    "is_really_jpeg.png": (encode(blocks(40), "JPEG"), b"a jpeg named png"),
    "bom.png": (encode(blocks(41), "PNG"), "\ufeffa caption with a bom".encode()),
    "utf16.png": (encode(blocks(42), "PNG"), "a utf-16 caption".encode("utf-16")),
    "ctrl.png": (encode(blocks(43), "PNG"), b"tab\there\x07bell"),
}


def test_corrupted_corpus_each_file_gets_a_clear_reason(tmp_path):
    raw = _raw(tmp_path)
    a = raw / "impressionist"
    for name, (data, caption, _) in REJECTED_CORPUS.items():
        put(a, name, data, caption=None)
        if caption is not None:
            (a / name).with_suffix(".txt").write_bytes(caption)
        elif not name.startswith("noext"):
            (a / name).with_suffix(".txt").write_text("a caption")
    for name, (data, caption) in ACCEPTED_CORPUS.items():
        put(a, name, data, caption=None)
        (a / name).with_suffix(".txt").write_bytes(caption)
    (a / "metadata.jsonl").write_bytes(
        b'{"file_name": "x.png"}\n[1, 2]\n\xff\xfe garbage\n' + b"[" * 100_000 + b"\n" + b'{"file_name": "a\\u0000", "text": "t"}\n'
    )
    report, rejected, records = _run(raw, tmp_path / "out")
    got = {f.removeprefix("impressionist/"): r.reason for f, r in rejected.items()}
    assert got == {name: reason for name, (_, _, reason) in REJECTED_CORPUS.items()}
    for rej in report.rejections:
        assert rej.detail and rej.reason in REMEDIES
    by_source = {r["source"].removeprefix("impressionist/"): r for r in records}
    assert set(ACCEPTED_CORPUS) <= set(by_source)
    assert by_source["utf16.png"]["caption"] == "a utf-16 caption"
    assert by_source["bom.png"]["caption"] == "a caption with a bom"
    assert by_source["ctrl.png"]["caption"] == "tab here bell"
    for name in ("cmyk.jpg", "sixteen.png", "palette.png"):
        with Image.open(tmp_path / "out" / by_source[name]["path"]) as img:
            assert img.mode == "RGB" and np.asarray(img).std() > 10  # real picture, not flat
    # metadata.jsonl: an unreadable file is one warning (UTF-8 fails), never a crash
    assert any(w.reason in ("unreadable_metadata", "bad_metadata_line") for w in report.warnings)
