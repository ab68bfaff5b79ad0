"""Release bundle: build, verify, and detect tampering, deletion and additions."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from stunning.bundle import (
    SUMS_NAME,
    BundleError,
    build_bundle,
    format_sums,
    parse_sums,
    render_example,
    verify_bundle,
)
from stunning.config import Params
from tests.factories import make_release_inputs

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture()
def bundle(tmp_path):
    adapters, blends, card = make_release_inputs(tmp_path)
    out = tmp_path / "dist" / "release"
    summary = build_bundle(out, adapters, blends, card, Params())
    return out, summary


def test_build_layout_and_verify_ok(bundle):
    out, summary = bundle
    for rel in (
        "adapters/impressionist/pytorch_lora_weights.safetensors",
        "adapters/noir/train_config.yaml",
        "blends/half-half/pytorch_lora_weights.safetensors",
        "blends.yaml",
        "README.md",
        "grid.png",
        "example.py",
        "manifest.json",
        SUMS_NAME,
    ):
        assert (out / rel).is_file(), rel
    result = verify_bundle(out)
    assert result.ok, result.describe()
    assert result.checked == summary["files"] - 1  # everything but SHA256SUMS itself

    sums, bad = parse_sums((out / SUMS_NAME).read_text())
    assert not bad and list(sums) == sorted(sums) and "manifest.json" in sums
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} == set(sums) - {"manifest.json"}
    assert all(f["size"] == (out / f["path"]).stat().st_size for f in manifest["files"])
    assert len(manifest["params_sha256"]) == 64 and manifest["created"]
    assert yaml.safe_load((out / "blends.yaml").read_text())["blends"]["half-half"]["weights"] == {
        "impressionist": 0.5,
        "noir": 0.5,
    }


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="GNU sha256sum not installed")
def test_sha256sum_compatible(bundle):
    out, _ = bundle
    proc = subprocess.run(["sha256sum", "--check", "--strict", SUMS_NAME], cwd=out, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_verify_reports_tampered_deleted_and_added_files(bundle):
    out, _ = bundle
    with (out / "adapters" / "noir" / "pytorch_lora_weights.safetensors").open("r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 0xFF]))
    (out / "grid.png").unlink()
    (out / "adapters" / "noir" / "extra.safetensors").write_bytes(b"sneaky")
    (out / ".DS_Store").write_bytes(b"finder")  # OS clutter is not a difference
    result = verify_bundle(out)
    assert not result.ok
    assert result.changed == ["adapters/noir/pytorch_lora_weights.safetensors"]
    assert result.missing == ["grid.png"]
    assert result.unexpected == ["adapters/noir/extra.safetensors"]
    text = result.describe()
    assert "changed:    adapters/noir/pytorch_lora_weights.safetensors" in text and "missing:    grid.png" in text


def test_verify_catches_edited_checksums_and_escaping_paths(bundle):
    out, _ = bundle
    sums = (out / SUMS_NAME).read_text()
    (out / SUMS_NAME).write_text(sums + "0" * 64 + "  ../outside.txt\nnot a checksum line\n")
    result = verify_bundle(out)
    assert not result.ok and len(result.errors) == 2
    (out / SUMS_NAME).unlink()
    result = verify_bundle(out)
    assert not result.ok and "SHA256SUMS not found" in result.errors[0]


def test_sums_round_trip():
    entries = {"b/x": "a" * 64, "a": "b" * 64}
    parsed, bad = parse_sums(format_sums(entries))
    assert parsed == entries and not bad
    assert parse_sums("c" * 64 + " *binary/mode\n")[0] == {"binary/mode": "c" * 64}


def test_build_is_reproducible_with_source_date_epoch(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    adapters, blends, card = make_release_inputs(tmp_path)
    build_bundle(tmp_path / "a", adapters, blends, card, Params())
    build_bundle(tmp_path / "b", adapters, blends, card, Params())
    assert (tmp_path / "a" / SUMS_NAME).read_text() == (tmp_path / "b" / SUMS_NAME).read_text()
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["created"].startswith("2023-11-14")


def test_params_hash_tracks_artefact_sections_only():
    from stunning.bundle import params_hash

    base = params_hash(Params())
    assert params_hash(Params.model_validate({"train": {"rank": 8}})) != base
    assert params_hash(Params.model_validate({"registry": {"model_name": "other"}})) == base


def test_missing_inputs_are_named(tmp_path):
    adapters, blends, card = make_release_inputs(tmp_path)
    shutil.rmtree(adapters / "noir")
    with pytest.raises(BundleError, match="adapter of style 'noir'.*train"):
        build_bundle(tmp_path / "out", adapters, blends, card, Params())
    assert not (tmp_path / "out").exists()  # nothing half-built
    adapters, blends, card = make_release_inputs(tmp_path / "again")
    (card / "README.md").unlink()
    with pytest.raises(BundleError, match="README.md.*docs"):
        build_bundle(tmp_path / "out", adapters, blends, card, Params())


def test_example_uses_stock_diffusers_only():
    source = render_example(Params(), base_model="stunning-engine/embedded-micro")
    tree = ast.parse(source)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert "stunning" not in imported
    assert imported <= {"argparse", "json", "pathlib", "torch", "yaml", "diffusers"}
    assert "load_lora_weights" in source and "set_adapters" in source


@pytest.mark.slow
def test_example_runs_against_a_real_base_model(tiny_base, tmp_path):
    """example.py loads the embedded base model and real diffusers LoRA files, with no stunning import."""
    pytest.importorskip("stunning.embedded")
    import torch
    from peft import LoraConfig

    from stunning.families import get_family

    base = tiny_base  # SD3 without T5, like the micro model
    params = Params.model_validate({"base": {"source": "local", "path": str(base)}})
    adapters, blends, card = make_release_inputs(tmp_path / "inputs", params)
    fam = get_family("sd3")
    pipe = fam.load_pipeline(base, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    pipe.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian")
    )
    for folder in [adapters / s for s in params.data.styles] + [blends / b.name for b in params.merge.blends]:
        fam.save_lora(pipe, folder)
    out = tmp_path / "release"
    build_bundle(out, adapters, blends, card, params)
    # --style takes the same load path as --mix with one adapter; two runs cover both folders.
    for extra in (["--blend", "half-half"], ["--mix", "impressionist=0.5", "noir=0.5"]):
        img = tmp_path / f"{extra[1]}.png"
        proc = subprocess.run(
            [sys.executable, str(out / "example.py"), "--base", str(base), "--steps", "2", "--out", str(img), *extra],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert img.is_file()
    assert verify_bundle(out).ok  # running the example wrote nothing into the bundle
