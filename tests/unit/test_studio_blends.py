"""Saved studio blends: YAML files by name, and promotion into params.yaml's merge.blends."""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import pytest
import yaml

from stunning.studio.blends import (
    BlendFileError,
    SavedBlend,
    delete_blend,
    list_blends,
    load_blend,
    promote_to_params,
    save_blend,
)

REPO = Path(__file__).resolve().parents[2]


def test_saved_blends_round_trip_in_the_merge_blends_format(tmp_path):
    folder = tmp_path / "studio/blends"
    path = save_blend(SavedBlend("soft-noir", {"noir": 0.7, "impressionist": -0.3}, "blurry"), folder)
    assert path == folder / "soft-noir.yaml"
    assert yaml.safe_load(path.read_text()) == {
        "name": "soft-noir", "weights": {"noir": 0.7, "impressionist": -0.3}, "negative_prompt": "blurry"}
    save_blend({"name": "loud", "weights": {"noir": 1.5}}, folder)
    assert load_blend("soft-noir", folder) == SavedBlend("soft-noir", {"noir": 0.7, "impressionist": -0.3}, "blurry")
    assert [b.name for b in list_blends(folder)] == ["loud", "soft-noir"]
    assert load_blend("loud", folder).negative_prompt is None
    assert delete_blend("loud", folder) and not delete_blend("loud", folder)
    with pytest.raises(BlendFileError, match=r"no saved blend 'loud'.*\['soft-noir'\]"):
        load_blend("loud", folder)
    assert list_blends(tmp_path / "nowhere") == []


@pytest.mark.parametrize(
    ("blend", "message"),
    [
        ({"name": "../etc", "weights": {"noir": 1}}, "blend name '../etc' is not valid"),
        ({"name": "x", "weights": {}}, "key 'weights' must be a non-empty mapping"),
        ({"name": "x", "weights": {"noir": 2.5}}, r"key 'weights.noir' is 2.5; use a weight in \[-2, 2\]"),
        ({"name": "x", "weights": {"noir": "lots"}}, "key 'weights.noir' is 'lots'"),
        ({"name": "x", "weights": {f"s{i}": 0.1 for i in range(9)}}, "at most 8"),
        ({"name": "x", "weights": {"noir": 1}, "colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ],
)
def test_invalid_blends_are_refused_naming_the_key(tmp_path, blend, message):
    with pytest.raises(BlendFileError, match=message):
        save_blend(blend, tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_broken_file_is_reported_with_its_path(tmp_path):
    (tmp_path / "odd.yaml").write_text("name: other\nweights: {noir: 1}\n")
    with pytest.raises(BlendFileError, match=r"odd.yaml: key 'name' is 'other' but the file is named 'odd'"):
        list_blends(tmp_path)
    (tmp_path / "odd.yaml").write_text("name: [unclosed\n")
    with pytest.raises(BlendFileError, match="odd.yaml: not valid YAML"):
        load_blend("odd", tmp_path)


def _diff(before: str, after: str) -> list[str]:
    return [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def test_promote_adds_or_replaces_one_entry_keeping_comments_and_layout(tmp_path):
    from stunning.config import load_params

    params = shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    original = Path(params).read_text()
    folder = tmp_path / "blends"
    save_blend(SavedBlend("soft-noir", {"noir": 0.7, "impressionist": -0.3}, "blurry"), folder)
    result = promote_to_params("soft-noir", params, folder)
    assert result == {"params": str(params), "blend": {"name": "soft-noir",
                                                       "weights": {"noir": 0.7, "impressionist": -0.3}},
                      "replaced": False}
    added = Path(params).read_text()
    assert _diff(original, added) == ["+    - name: soft-noir", "+      weights: {noir: 0.7, impressionist: -0.3}"]
    blends = load_params(params).merge.blends
    assert [(b.name, b.weights) for b in blends][-1] == ("soft-noir", {"noir": 0.7, "impressionist": -0.3})

    save_blend(SavedBlend("half-half", {"impressionist": 0.6, "noir": 0.4}), folder)
    assert promote_to_params("half-half", params, folder)["replaced"] is True
    assert _diff(added, Path(params).read_text()) == [
        "-      weights: {impressionist: 0.5, noir: 0.5}", "+      weights: {impressionist: 0.6, noir: 0.4}"]
    assert [b.name for b in load_params(params).merge.blends] == ["half-half", "soft-noir"]


def test_promote_refuses_styles_the_project_does_not_train_and_leaves_the_file(tmp_path):
    params = shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    original = Path(params).read_text()
    save_blend(SavedBlend("cubist", {"cubism": 1.0}), tmp_path / "blends")
    with pytest.raises(BlendFileError, match=r"(?s)params.yaml.*cubism.*left unchanged"):
        promote_to_params("cubist", params, tmp_path / "blends")
    assert Path(params).read_text() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blends", "params.yaml"]  # no temporary left


@pytest.mark.parametrize(
    "merge",
    ["merge:\n  fuse: noir  # the style itself\n", "merge:\n  blends: []\n  fuse: noir\n", ""],
)
def test_promote_into_a_params_file_without_blends(tmp_path, merge):
    text = "data:\n  styles: [noir, impressionist]  # two styles\n" + merge
    params = tmp_path / "params.yaml"
    params.write_text(text)
    save_blend(SavedBlend("half-half", {"noir": 0.5, "impressionist": 0.5}), tmp_path / "b")
    promote_to_params("half-half", params, tmp_path / "b")  # (the name merge.fuse defaults to)
    data = yaml.safe_load(params.read_text())
    assert data["merge"]["blends"] == [{"name": "half-half", "weights": {"noir": 0.5, "impressionist": 0.5}}]
    kept = [line for line in text.splitlines() if "#" in line]
    assert kept and all(line in params.read_text().splitlines() for line in kept)
