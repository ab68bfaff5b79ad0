"""Stage `handoff`: builds and verifies the release bundle, exit 2 on missing inputs."""

from __future__ import annotations

import pytest

from stunning.bundle import verify_bundle
from tests.factories import make_release_inputs


def test_handoff_stage(tmp_path, capsys):
    from stages import handoff

    adapters, blends, card = make_release_inputs(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("{}\n")
    out = tmp_path / "dist" / "release"
    handoff.main(
        [
            "--params",
            str(params_file),
            "--adapters",
            str(adapters),
            "--blends",
            str(blends),
            "--model-card",
            str(card),
            "--out",
            str(out),
        ]
    )
    assert verify_bundle(out).ok
    assert "checksums verified" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        handoff.main(
            [
                "--params",
                str(params_file),
                "--adapters",
                str(tmp_path / "nope"),
                "--blends",
                str(blends),
                "--model-card",
                str(card),
                "--out",
                str(out),
            ]
        )
    assert exc.value.code == 2
