"""Stage `handoff`: builds and verifies the release bundle of the promoted model only (the
candidate if the register stage promoted it, else the @champion, else exit 2), exit 2 on
missing inputs."""

from __future__ import annotations

import json
from pathlib import Path

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
            "--registry-report",
            str(promoted_report(tmp_path)),
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
                "--registry-report",
                str(promoted_report(tmp_path)),
                "--out",
                str(out),
            ]
        )
    assert exc.value.code == 2


def promoted_report(root: Path, promoted: bool = True, version: int = 4) -> Path:
    """reports/registry.json as the register stage writes it (the fields handoff reads)."""
    path = root / "registry.json"
    path.write_text(json.dumps({
        "model_name": "stunning-style", "version": version, "promoted": promoted,
        "reasons": [] if promoted else ["style_gain/noir = 0.1: must be >= 0.5"],
        "created": "2026-01-02T03:04:05+00:00",
    }))
    return path


def _handoff(root: Path, adapters, blends, card, report: Path, out: Path, *extra: str):
    from stages import handoff

    params_file = root / "params.yaml"
    if not params_file.is_file():
        params_file.write_text("{}\n")
    handoff.main(["--params", str(params_file), "--adapters", str(adapters), "--blends", str(blends),
                  "--model-card", str(card), "--registry-report", str(report), "--out", str(out), *extra])


def test_a_promoted_candidate_is_handed_off_with_its_registered_time(tmp_path):
    adapters, blends, card = make_release_inputs(tmp_path)
    out = tmp_path / "release"
    _handoff(tmp_path, adapters, blends, card, promoted_report(tmp_path), out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == {"source": "candidate", "version": 4}
    assert manifest["created"] == "2026-01-02T03:04:05+00:00"  # the version's, not the clock's
    first = (out / "manifest.json").read_bytes()
    _handoff(tmp_path, adapters, blends, card, promoted_report(tmp_path), out)
    assert (out / "manifest.json").read_bytes() == first  # rebuilt: the same bytes


def test_a_blocked_candidate_without_a_champion_is_never_handed_off(tmp_path, monkeypatch, capsys):
    adapters, blends, card = make_release_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)  # no registry database here: no champion
    out = tmp_path / "release"
    with pytest.raises(SystemExit) as exc:
        _handoff(tmp_path, adapters, blends, card, promoted_report(tmp_path, promoted=False), out)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "was not promoted" in err and "no @champion" in err and "style_gain/noir" in err
    assert not out.exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_blocked_candidate_hands_off_the_champion_instead(tmp_path, tiny_base, monkeypatch):
    from stunning.config import RegistryConfig
    from stunning.registry import register_candidate
    from tests.factories import gate_report, make_registry_candidate, make_registry_store

    root = make_registry_store(tmp_path / "project")
    champion = make_registry_candidate(tmp_path / "champion")
    registered = register_candidate(RegistryConfig(), gate_report(True), champion, tiny_base, "sd3", {}, root=root)
    assert registered["promoted"]
    blocked, blends, card = make_release_inputs(tmp_path / "candidate")
    monkeypatch.chdir(root)
    out = tmp_path / "release"
    _handoff(root, blocked, blends, card, promoted_report(root, promoted=False, version=registered["version"] + 1), out,
             "--export", str(_export_folder(tmp_path)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["source"] == "champion" and manifest["model"]["version"] == registered["version"]
    # build/export holds the blocked candidate's exports: the champion's bundle does not carry them
    assert manifest["exports"] is False and not (out / "export").exists()
    assert "unpromoted candidate" in manifest["model"]["exports_omitted"]
    assert manifest["created"] == registered["created"]
    shipped = (out / "adapters" / "noir" / "pytorch_lora_weights.safetensors").read_bytes()
    assert shipped == (champion["adapters"] / "noir" / "pytorch_lora_weights.safetensors").read_bytes()
    assert shipped != (blocked / "noir" / "pytorch_lora_weights.safetensors").read_bytes()


def _export_folder(root: Path) -> Path:
    """A folder laid out like build/export (the bundle copies files; their content is the export stage's business)."""
    export = root / "build" / "export"
    (export / "coreml" / "denoiser.mlpackage" / "Data").mkdir(parents=True)
    (export / "coreml" / "denoiser.mlpackage" / "Manifest.json").write_text("{}")
    (export / "coreml" / "denoiser.mlpackage" / "Data" / "weight.bin").write_bytes(b"\x00\x01" * 64)
    (export / "swift").mkdir()
    (export / "swift" / "resources.json").write_text("{}")
    (export / "export.json").write_text(json.dumps({"format": "stunning-export/1", "artifacts": []}))
    return export


def test_the_exports_go_into_the_bundle_under_export_and_its_checksums_cover_them(tmp_path):
    from stages import handoff

    adapters, blends, card = make_release_inputs(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    out = tmp_path / "release"
    argv = ["--params", str(tmp_path / "params.yaml"), "--adapters", str(adapters), "--blends", str(blends),
            "--model-card", str(card), "--registry-report", str(promoted_report(tmp_path)), "--out", str(out),
            "--export", str(_export_folder(tmp_path))]
    handoff.main(argv)
    manifest = json.loads((out / "manifest.json").read_text())
    paths = {f["path"] for f in manifest["files"]}
    assert {"export/export.json", "export/swift/resources.json",
            "export/coreml/denoiser.mlpackage/Data/weight.bin"} <= paths
    assert "export/coreml/denoiser.mlpackage/Data/weight.bin" in (out / "SHA256SUMS").read_text()
    assert manifest["exports"] is True and verify_bundle(out).ok
    (out / "export" / "coreml" / "denoiser.mlpackage" / "Data" / "weight.bin").write_bytes(b"tampered")
    assert verify_bundle(out).changed == ["export/coreml/denoiser.mlpackage/Data/weight.bin"]

    (tmp_path / "build" / "export" / "export.json").unlink()  # an export folder without its report
    with pytest.raises(SystemExit) as exc:
        handoff.main(argv)
    assert exc.value.code == 2
