"""Property-based fuzzing of caption and metadata.jsonl parsing: never a crash; every image is
accepted or rejected with a known reason, every bad metadata line is a warning naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stunning.data.images import REMEDIES, ImageRejected  # noqa: E402
from stunning.data.ingest import (  # noqa: E402
    MAX_CAPTION_BYTES,
    _caption_for,
    _normalise_caption,
    _read_caption,
    _read_metadata,
)

FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

BOMS = [b"", b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\xff\xfe\x00\x00"]
texts = st.text(st.characters(codec="utf-8"), max_size=200)
caption_bytes = st.one_of(
    st.binary(max_size=400),
    st.tuples(st.sampled_from(BOMS), st.binary(max_size=200)).map(lambda t: t[0] + t[1]),
    st.tuples(texts, st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "latin-1", "cp1252", "utf-32"])).map(
        lambda t: t[0].encode(t[1], errors="replace")
    ),
    st.integers(1, 3).map(lambda k: b"long words " * (30_000 * k)),
)


def _check_caption_result(path: Path) -> None:
    try:
        text = _normalise_caption(_read_caption(path), path.name)
    except ImageRejected as exc:
        assert exc.reason in REMEDIES and exc.detail
        return
    assert isinstance(text, str) and "\x00" not in text and "\n" not in text
    text.encode("utf-8")  # always writable as the curated .txt and manifest
    assert text == " ".join(text.split())


@FUZZ
@given(data=caption_bytes)
def test_any_caption_file_is_text_or_a_reasoned_rejection(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cap") / "x.txt"
    path.write_bytes(data)
    _check_caption_result(path)
    if len(data) > MAX_CAPTION_BYTES:
        with pytest.raises(ImageRejected, match="at most"):
            _read_caption(path)


@FUZZ
@given(text=st.text(max_size=300))  # includes lone surrogates, NULs, control characters
def test_any_caption_string_normalises_or_is_rejected(text):
    try:
        out = _normalise_caption(text, "the caption")
    except ImageRejected as exc:
        assert exc.reason == "unreadable_caption"
        return
    out.encode("utf-8")
    assert out == " ".join(out.split())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
entries = st.one_of(
    json_values.map(json.dumps),
    st.fixed_dictionaries({"file_name": st.text(max_size=40), "text": st.text(max_size=80)}).map(json.dumps),
    st.fixed_dictionaries({"file_name": json_values, "text": json_values}).map(json.dumps),
    st.text(max_size=80),
    st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
    st.integers(1, 5).map(lambda k: "[" * (2000 * k)),
    st.just('{"file_name": "a.png", "text": ' + "9" * 5000 + "}"),
)


@FUZZ
@given(lines=st.lists(entries, max_size=8), raw_bytes=st.binary(max_size=100), use_bytes=st.booleans())
def test_any_metadata_jsonl_yields_captions_or_warnings(tmp_path_factory, lines, raw_bytes, use_bytes):
    raw = tmp_path_factory.mktemp("meta")
    folder = raw / "style"
    folder.mkdir()
    meta = folder / "metadata.jsonl"
    if use_bytes:
        meta.write_bytes(raw_bytes)
    else:
        meta.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    warnings = []
    captions = _read_metadata([meta], raw, warnings)
    for w in warnings:
        assert w.reason in ("bad_metadata_line", "unreadable_metadata") and w.detail
        assert w.file.startswith("style/metadata.jsonl")
    for target, (text, source) in captions.items():
        assert isinstance(target, Path) and isinstance(text, str) and source == "style/metadata.jsonl"
    if not use_bytes:
        nonblank = [ln for ln in "\n".join(lines).splitlines() if ln.strip()]
        # every non-blank line is a caption or a warning (later duplicates overwrite earlier ones)
        assert len(captions) <= len(nonblank) and len([w for w in warnings if w.reason == "bad_metadata_line"]) <= len(nonblank)
    # and an image those captions name is accepted or rejected with a reason, never a crash
    image = folder / "a.png"
    image.write_bytes(b"")
    try:
        text = _caption_for(image, captions, set())
        text.encode("utf-8")
    except ImageRejected as exc:
        assert exc.reason in REMEDIES
    shutil.rmtree(raw)
