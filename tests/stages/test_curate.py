"""Stage `curate`: the curated set and both reports, exit 1 on unfit data, exit 2 on missing input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.factories import make_ingested_with_flaws

N_GOOD = 6


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """Per style: N_GOOD distinct sharp images, then one blurry, one near-duplicate,
    one with a one-word caption and one small original."""
    return make_ingested_with_flaws(tmp_path_factory.mktemp("curate"), N_GOOD)


def test_curate_stage_main(ingested, tmp_path, capsys):
    from stages.curate import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"curate": {"min_resolution": 30, "min_images_per_style": 2}}))
    out, stats, val = tmp_path / "curated", tmp_path / "r/curate.json", tmp_path / "r/data_validation.json"
    args = ["--params", str(params), "--ingested", str(ingested), "--out", str(out),
            "--stats", str(stats), "--validation-report", str(val)]
    main(args)
    assert (out / "manifest.csv").is_file()
    assert json.loads(stats.read_text())["kept"] == 2 * N_GOOD and json.loads(val.read_text())["success"]
    assert "data validation passed" in capsys.readouterr().out

    # unfit data: exit 1, nothing published, both reports still written for the user
    params.write_text(yaml.safe_dump({"curate": {"min_resolution": 30, "min_images_per_style": 40}}))
    stats.unlink()
    val.unlink()
    args[args.index(str(out))] = str(tmp_path / "curated2")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "too few training images" in err and "min_images_per_style (40)" in err
    assert not (tmp_path / "curated2").exists()
    written = json.loads(stats.read_text())
    assert written["kept"] == 2 * N_GOOD and len(written["drops"]) == 8  # the user can see why
    assert json.loads(val.read_text())["success"] is False

    with pytest.raises(SystemExit) as exit_info:
        main(["--params", str(params), "--ingested", str(tmp_path / "none"), "--out", str(out),
              "--stats", str(stats), "--validation-report", str(val)])
    assert exit_info.value.code == 2
