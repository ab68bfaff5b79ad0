"""Stage `docs`: the model card and its grid from the stage reports."""

from __future__ import annotations

from tests.factories import write_model_card_reports


def test_docs_stage(tmp_path, capsys):
    from stages import docs

    reports, grid = write_model_card_reports(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("{}\n")
    out = tmp_path / "build" / "model_card"
    docs.main(["--params", str(params_file), "--reports", str(reports), "--grid", str(grid), "--out", str(out)])
    assert (out / "README.md").is_file() and (out / "grid.png").is_file()
    assert "gate FAILED" in capsys.readouterr().out
