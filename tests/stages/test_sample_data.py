"""Stage `sample_data`: writes the embedded sample set, exit 2 on an unknown style."""

from __future__ import annotations

import pytest
import yaml


def test_stage_main(tmp_path, capsys):
    from stages.sample_data import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"sample_images_per_style": 3}}))
    main(["--params", str(params), "--out", str(tmp_path / "sample")])
    assert len(list((tmp_path / "sample/noir").glob("look_*.png"))) == 3
    assert "3 images x 2 styles" in capsys.readouterr().out

    params.write_text(yaml.safe_dump({"data": {"styles": ["impressionist", "noir", "cubism"]}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", str(params), "--out", str(tmp_path / "sample2")])
    assert exit_info.value.code == 2
    assert "cubism" in capsys.readouterr().err
