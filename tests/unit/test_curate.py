"""Curation filters, the deterministic split, the Great Expectations gate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from stunning.config import CurateConfig, DataConfig
from stunning.data import DataError
from stunning.data.curate import (
    MANIFEST_COLUMNS,
    CurationFailed,
    assign_splits,
    curate,
    manifest_frame,
    read_curated_manifest,
)
from stunning.data.expectations import validate_manifest, write_validation_report
from tests.factories import make_ingested_with_flaws

STYLES = ["impressionist", "noir"]
DATA = DataConfig(styles=STYLES)
N_GOOD = 6


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """Per style: N_GOOD distinct sharp images, then one blurry, one near-duplicate,
    one with a one-word caption and one small original."""
    return make_ingested_with_flaws(tmp_path_factory.mktemp("curate"), N_GOOD)


CFG = CurateConfig(min_resolution=30, min_images_per_style=2)


def _sources(ingested: Path) -> dict[str, str]:
    return {
        r["id"]: r["source"]
        for r in map(json.loads, (ingested / "manifest.jsonl").read_text().splitlines())
    }


def test_filters_drop_exactly_the_bad_images(ingested, tmp_path):
    out = tmp_path / "curated"
    result = curate(ingested, out, DATA, CFG, validate=False)
    reasons = {(d.source, d.reason) for d in result.drops}
    for style in STYLES:
        assert (f"{style}/blurry.png", "blurry") in reasons
        assert (f"{style}/short.png", "short_caption") in reasons
        assert (f"{style}/small.png", "low_resolution") in reasons
    near = [d for d in result.drops if d.reason == "near_duplicate"]
    assert len(near) == 2 and len(result.drops) == 8
    sources = _sources(ingested)
    kept_ids = {r["id"] for r in result.rows}
    for drop in near:
        # the pair is img<style 0> + near.png; the one with the smaller id is kept
        twin = next(i for i in kept_ids if i in drop.detail)
        assert {Path(sources[drop.id]).name, Path(sources[twin]).name} == {"img0.png", "near.png"}
        assert twin < drop.id
    assert result.stats["dropped_by_reason"] == {
        "low_resolution": 2, "blurry": 2, "short_caption": 2, "near_duplicate": 2,
    }
    assert result.stats["kept"] == 2 * N_GOOD and result.stats["ingested"] == 2 * (N_GOOD + 4)

    # published layout
    with (out / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == MANIFEST_COLUMNS and len(rows) == 2 * N_GOOD
    for row in rows:
        png = out / row["path"]
        assert row["path"] == f"{row['split']}/{row['style']}/{row['id']}.png" and png.is_file()
        assert png.with_suffix(".txt").read_text().strip() == row["caption"]
        assert float(row["blur"]) >= CFG.blur_threshold and int(row["caption_words"]) >= 2
    with (out / "dropped.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 8
    df = read_curated_manifest(out)
    assert len(df) == 2 * N_GOOD and all(isinstance(i, str) and len(i) == 16 for i in df["id"])

    stats = result.stats
    for style in STYLES:
        s = stats["by_style"][style]
        assert s["train"] + s["val"] == N_GOOD and s["val"] >= 1
        assert 0 <= s["mean_r"] <= 255 and s["mean_blur"] >= CFG.blur_threshold
    json.dumps(stats)  # metrics must be plain JSON


def test_thresholds_change_what_is_dropped(ingested, tmp_path):
    loose = CurateConfig(min_resolution=24, blur_threshold=0.0, min_caption_words=1, min_images_per_style=2)
    result = curate(ingested, tmp_path / "c", DATA, loose, validate=False)
    assert {d.reason for d in result.drops} == {"near_duplicate"}
    assert result.stats["kept"] == 2 * (N_GOOD + 3)


def test_assign_splits_is_deterministic_and_stable():
    ids = [f"{i:016x}" for i in range(1000)]
    first = assign_splits(ids, 0.2, seed=0)
    assert first == assign_splits(list(reversed(ids)), 0.2, seed=0)
    assert 150 < sum(v == "val" for v in first.values()) < 250
    # adding images never moves existing ones
    more = assign_splits(ids + [f"extra{i}" for i in range(50)], 0.2, seed=0)
    assert all(more[i] == first[i] for i in ids)
    assert assign_splits(ids, 0.2, seed=1) != first
    # small styles: at least one val and one train image
    for n in (2, 3, 5):
        small = assign_splits(ids[:n], 0.01, seed=0)
        assert list(small.values()).count("val") == 1
        assert set(assign_splits(ids[:n], 0.0, seed=0).values()) == {"train"}  # 0: no val split
        assert "train" in assign_splits(ids[:n], 0.99, seed=0).values()
    assert assign_splits(ids[:1], 0.5, seed=0) in ({ids[0]: "train"}, {ids[0]: "val"})


def test_curate_output_is_deterministic(ingested, tmp_path):
    curate(ingested, tmp_path / "a", DATA, CFG, validate=False)
    curate(ingested, tmp_path / "b", DATA, CFG, validate=False)
    assert (tmp_path / "a/manifest.csv").read_bytes() == (tmp_path / "b/manifest.csv").read_bytes()


def test_too_few_images_fails_and_publishes_nothing(ingested, tmp_path):
    with pytest.raises(CurationFailed) as err:
        curate(ingested, tmp_path / "c", DATA, CurateConfig(min_resolution=30, min_images_per_style=50),
               validate=False)
    msg = str(err.value)
    assert "impressionist" in msg and "noir" in msg and "min_images_per_style=50" in msg
    assert err.value.result.stats["kept"] == 2 * N_GOOD
    assert not (tmp_path / "c").exists()


def test_missing_ingest_output_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="run the ingest stage first"):
        curate(tmp_path / "nothing", tmp_path / "c", DATA, CFG)


# --- Great Expectations (imported once for the module: it takes seconds) ---------------


@pytest.fixture(scope="module")
def validated(ingested, tmp_path_factory):
    return curate(ingested, tmp_path_factory.mktemp("validated") / "curated", DATA, CFG)


def test_suite_passes_on_good_data(validated, tmp_path):
    report = validated.validation
    assert report is not None and report.success, report.failure_text()
    names = [o.name for o in report.outcomes]
    assert "id is unique" in names
    assert "style 'noir' has >= curate.min_images_per_style (2) train images" in names
    for style in STYLES:
        outcome = next(o for o in report.outcomes if o.name.startswith(f"style '{style}' has"))
        assert outcome.observed["observed_value"] == validated.stats["by_style"][style]["train"]
    write_validation_report(report, tmp_path / "v.json")
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["success"] and data["failed"] == 0 and data["evaluated"] == len(report.outcomes)
    assert {"name", "expectation", "kwargs", "success", "observed"} <= set(data["expectations"][0])


def test_suite_fails_readably_on_a_broken_manifest(validated):
    df = manifest_frame(validated.rows)
    df.loc[1, "id"] = df.loc[0, "id"]  # duplicate id
    df.loc[2, "width"] = 31  # wrong size
    df.loc[3, "style"] = "cubism"  # unknown style
    df.loc[4, "split"] = "test"
    df.loc[5, "caption"] = None
    df = df.drop(columns=["blur"])
    report = validate_manifest(df, DATA, CurateConfig(min_images_per_style=100))
    assert not report.success
    failed = {o.name for o in report.failures}
    assert {
        "id is unique",
        "width == data.resolution (32)",
        "style is one of data.styles ['impressionist', 'noir']",
        "split is train or val",
        "caption is present",
        "column 'blur' exists",
        "blur score >= curate.blur_threshold (5.0)",
        "style 'impressionist' has >= curate.min_images_per_style (100) train images",
    } <= failed
    assert "height == data.resolution (32)" not in failed
    text = report.failure_text()
    assert "cubism" in text and str(df.loc[3, "id"]) in text and "31" in text
    assert 'The column "blur"' in text  # the missing column is named, not a traceback
