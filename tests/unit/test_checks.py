"""Input checks (`stunning.checks`): a corpus of damaged adapter and checkpoint files, each
refused with a clear user error naming the file and the fix, never a raw traceback."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stunning.checks import (
    AdapterError,
    CheckpointError,
    check_adapter,
    check_checkpoint,
    check_safetensors,
)
from stunning.families.base import LORA_FILE

RANK = 4


def _lora(folder: Path, tensors: dict[str, torch.Tensor] | None = None, metadata: dict | None = None) -> Path:
    """A small, valid sd3-layout LoRA file (two transformer modules) unless `tensors` are given."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    if tensors is None:
        tensors = {}
        for m in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"):
            tensors[f"transformer.{m}.lora_A.weight"] = torch.randn(RANK, 32, generator=g)
            tensors[f"transformer.{m}.lora_B.weight"] = torch.randn(32, RANK, generator=g)
    save_file(tensors, str(folder / LORA_FILE), metadata=metadata)
    return folder / LORA_FILE


def _raw(folder: Path, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LORA_FILE).write_bytes(data)
    return folder / LORA_FILE


def _header(obj: dict, data: bytes = b"") -> bytes:
    h = json.dumps(obj).encode()
    return struct.pack("<Q", len(h)) + h + data


def test_a_valid_adapter_passes(tmp_path):
    f = _lora(tmp_path / "ok")
    assert check_adapter(tmp_path / "ok", "sd3") == f
    assert check_adapter(f) == f  # the file itself, no family: layout checks only
    info = check_safetensors(f)
    assert len(info.tensors) == 4


def test_a_real_trained_layout_adapter_passes(tiny_base, tmp_path):
    from tests.factories import random_lora

    f = random_lora(tiny_base, tmp_path / "real", "sd3", 0, metadata={"family": "sd3"})
    assert check_adapter(f.parent, "sd3") == f


def _corpus(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (adapter file, a phrase its error must contain)."""
    good = _lora(tmp_path / "good").read_bytes()
    rng = random.Random(0)
    nan = {
        "transformer.m.lora_A.weight": torch.full((RANK, 8), float("nan")),
        "transformer.m.lora_B.weight": torch.ones(8, RANK),
    }
    inf = {"transformer.m.lora_A.weight": torch.ones(RANK, 8), "transformer.m.lora_B.weight": torch.ones(8, RANK)}
    inf["transformer.m.lora_B.weight"][0, 0] = float("inf")
    return {
        "missing": (tmp_path / "missing" / LORA_FILE, "file not found"),
        "zero bytes": (_raw(tmp_path / "zero", b""), "empty (0 bytes)"),
        "five bytes": (_raw(tmp_path / "five", good[:5]), "truncated"),
        "truncated data": (_raw(tmp_path / "cut", good[: len(good) - 40]), "cut short"),
        "truncated header": (_raw(tmp_path / "cuthead", good[:60]), "header declares"),
        "random bytes": (_raw(tmp_path / "random", rng.randbytes(4096)), "header declares"),
        "random text": (_raw(tmp_path / "text", struct.pack("<Q", 20) + rng.randbytes(20)), "not valid JSON"),
        "header beyond file": (_raw(tmp_path / "beyond", struct.pack("<Q", 10**9) + b"{}"), "header declares"),
        "header not an object": (_raw(tmp_path / "list", _header([1, 2])), "not a JSON object"),  # type: ignore[arg-type]
        "unknown dtype": (
            _raw(tmp_path / "dtype", _header({"t": {"dtype": "X99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)),
            "unknown dtype",
        ),
        "size mismatch": (
            _raw(tmp_path / "size", _header({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4)),
            "needs 8 bytes",
        ),
        "negative shape": (
            _raw(tmp_path / "neg", _header({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4)),
            "non-negative",
        ),
        "nan tensor": (_lora(tmp_path / "nan", nan), "NaN or infinite"),
        "inf tensor": (_lora(tmp_path / "inf", inf), "NaN or infinite"),
        "not a lora": (_lora(tmp_path / "full", {"transformer.proj_out.weight": torch.ones(4, 4)}), "not a LoRA weight"),
        "wrong component": (
            _lora(tmp_path / "unet", {"unet.m.lora.down.weight": torch.ones(RANK, 8), "unet.m.lora.up.weight": torch.ones(8, RANK)}),
            "component 'unet'",
        ),
        "unpaired": (_lora(tmp_path / "unpaired", {"transformer.m.lora_A.weight": torch.ones(RANK, 8)}), "not paired"),
        "rank mismatch": (
            _lora(tmp_path / "rank", {"transformer.m.lora_A.weight": torch.ones(4, 8), "transformer.m.lora_B.weight": torch.ones(8, 2)}),
            "disagree on the rank",
        ),
        "empty lora": (_lora(tmp_path / "empty", {"transformer.m.alpha": torch.ones(())}), "no LoRA weights"),
        "other family": (_lora(tmp_path / "flux", metadata={"stunning.family": "flux"}), "'flux' family"),
    }


def test_every_damaged_adapter_gets_a_clear_error(tmp_path):
    for name, (path, phrase) in _corpus(tmp_path).items():
        with pytest.raises(AdapterError) as info:
            check_adapter(path.parent if name != "missing" else path, "sd3")
        msg = str(info.value)
        assert str(path) in msg, (name, msg)
        assert phrase in msg, (name, msg)
        assert "dvc repro train" in msg, (name, msg)
        assert len(msg) < 600, (name, len(msg))
        assert info.value.__cause__ is None, name  # one clear error, no chained traceback


def _checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    save_file({"transformer_blocks.0.attn.to_q.lora_A.default.weight": torch.ones(RANK, 8)}, str(folder / "lora.safetensors"))
    save_file({"torch": torch.zeros(16, dtype=torch.uint8)}, str(folder / "rng.safetensors"))
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    (folder / "state.json").write_text(json.dumps({"format": 1, "step": 2, "loss_history": [0.5, 0.4]}))
    return folder


def test_checkpoints_valid_and_damaged(tmp_path):
    assert check_checkpoint(_checkpoint(tmp_path / "ok")) == tmp_path / "ok"

    def damaged(name: str, damage) -> tuple[Path, str]:
        d = _checkpoint(tmp_path / name)
        return d, damage(d)

    cases = [
        damaged("no-state", lambda d: (d / "state.json").unlink() or "missing ['state.json']"),
        damaged("cut-lora", lambda d: (d / "lora.safetensors").write_bytes((d / "lora.safetensors").read_bytes()[:-9]) and "cut short"),
        damaged("zero-lora", lambda d: (d / "lora.safetensors").write_bytes(b"") or "empty (0 bytes)"),
        damaged("random-rng", lambda d: (d / "rng.safetensors").write_bytes(random.Random(1).randbytes(300)) and "header"),
        damaged("nan-lora", lambda d: save_file({"x.lora_A.weight": torch.tensor([float("nan")])}, str(d / "lora.safetensors")) or "NaN"),
        damaged("wrong-keys", lambda d: save_file({"proj.weight": torch.ones(2)}, str(d / "lora.safetensors")) or "non-LoRA"),
        damaged("bad-optimizer", lambda d: (d / "optimizer.pt").write_bytes(b"") or "not a torch archive"),
        damaged("bad-state", lambda d: (d / "state.json").write_text("{") and "not valid JSON"),
        damaged("short-history", lambda d: (d / "state.json").write_text('{"step": 3, "loss_history": [1]}') and "1 entries for step 3"),
    ]
    cases.append((tmp_path / "nowhere", "not found"))
    for folder, phrase in cases:
        with pytest.raises(CheckpointError) as info:
            check_checkpoint(folder)
        msg = str(info.value)
        assert str(folder) in msg and phrase in msg, (folder.name, msg)
        assert "delete that checkpoint folder" in msg


def test_checkpoint_error_is_a_value_error():
    # The checkpoint manager skips broken checkpoints on ValueError; the checks stay compatible.
    assert issubclass(CheckpointError, ValueError) and issubclass(AdapterError, ValueError)


def test_merge_preflight_refuses_a_damaged_adapter_before_loading_models(tiny_base, tmp_path):
    from stages.merge import _user_errors, preflight
    from stunning.config import load_params

    params = load_params("params.yaml")
    adapters = tmp_path / "adapters"
    for style in params.data.styles:
        _lora(adapters / style)
    victim = adapters / params.data.styles[0] / LORA_FILE
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(AdapterError) as info:
        preflight(params, tiny_base, adapters)
    assert str(victim) in str(info.value) and "dvc repro train" in str(info.value)
    assert AdapterError in _user_errors()


def test_validate_stage_checks_adapters_and_blends_first(tmp_path):
    from stages.validate import _user_errors
    from stunning.checks import check_stage_adapters
    from stunning.config import load_params

    params = load_params("params.yaml")
    adapters, merged = tmp_path / "adapters", tmp_path / "merged"
    for style in params.data.styles:
        _lora(adapters / style)
    check_stage_adapters(params, adapters, tmp_path / "not-merged-yet")  # missing blends: left to the stage
    if params.merge.blends:
        blend = _raw(merged / "blends" / params.merge.blends[0].name, b"")
        with pytest.raises(AdapterError) as info:
            check_stage_adapters(params, adapters, merged)
        assert str(blend) in str(info.value) and "dvc repro merge" in str(info.value)
    _raw(adapters / params.data.styles[-1], b"garbage!" * 3)
    with pytest.raises(AdapterError, match="dvc repro train"):
        check_stage_adapters(params, adapters, None)
    assert AdapterError in _user_errors()
