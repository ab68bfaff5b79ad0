"""Input checks: safetensors adapters and training checkpoints, validated before any model work.

A damaged weights file (a copy cut short, a zero-byte file, bytes that are no safetensors at
all, NaN weights, an adapter of another layout) otherwise surfaces late and badly: after a
minute of generation, as a raw `SafetensorError`, or as three chained tracebacks. The checks
here read the safetensors header by hand (it is a little-endian u64 length and a JSON object),
check every declared tensor against the file, then load each tensor once to check it is
finite, and raise a user error that names the file, what is wrong and what to run:

- :func:`check_safetensors` — any safetensors file (:class:`WeightsFileError`);
- :func:`check_adapter` / :func:`check_adapters` — a LoRA adapter file or folder in the
  family's diffusers layout (:class:`AdapterError`), what `merge`, `validate`
  (:func:`check_stage_adapters`) and serving (`StyleModel.load`) use;
- :func:`check_checkpoint` — a training checkpoint folder (:class:`CheckpointError`).

The module imports no model code at import time; `torch` is loaded only for the finiteness check.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stunning.families.base import LORA_FILE

if TYPE_CHECKING:
    from stunning.families import Family

__all__ = [
    "ADAPTER_FIX", "BLEND_FIX", "AdapterError", "CheckpointError", "SafetensorsInfo", "WeightsFileError",
    "check_adapter", "check_adapters", "check_checkpoint", "check_safetensors", "check_stage_adapters",
]

ADAPTER_FIX = "re-run the train stage (`dvc repro train`) to write it again"
BLEND_FIX = "re-run the merge stage (`dvc repro merge`) to write it again"
CHECKPOINT_FIX = (
    "delete that checkpoint folder: training then resumes from an earlier checkpoint or starts afresh"
)

# dtype -> bytes per element, as the safetensors format defines them (sub-byte types: None).
_DTYPE_BYTES: dict[str, int | None] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
    "F4": None, "F6_E2M3": None, "F6_E3M2": None,
}
_FLOAT_DTYPES = {"F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64"}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit

# `<component>.<module path>.<down/up>.weight` in either diffusers layout (as stunning.blend reads them).
_LORA_KEY = re.compile(r"^(?P<comp>[^.]+)\.(?P<module>.+)\.(?P<kind>lora\.down|lora\.up|lora_A|lora_B)\.weight$")
_LORA_EXTRA = re.compile(r"^(?P<comp>[^.]+)\..+\.(alpha|lora_magnitude_vector(\.weight)?|lora\.down\.bias|lora_B\.bias)$")
_DOWN = {"lora.down": "lora.up", "lora_A": "lora_B"}


class WeightsFileError(ValueError):
    """A safetensors weights file is missing or damaged; the message names it and the fix."""


class AdapterError(WeightsFileError):
    """A LoRA adapter file is missing, damaged or not a LoRA of the expected family (a user error)."""


class CheckpointError(WeightsFileError):
    """A training checkpoint folder is incomplete or damaged (a user error)."""


@dataclass
class SafetensorsInfo:
    """What a checked safetensors file declares."""

    path: Path
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str] = field(default_factory=dict)


def _fail(error: type[WeightsFileError], path: Path, problem: str, fix: str) -> WeightsFileError:
    return error(f"{path}: {problem}" + (f"; {fix}." if fix else "."))


def check_safetensors(
    path: str | Path,
    *,
    error: type[WeightsFileError] = WeightsFileError,
    fix: str = "",
    finite: bool = True,
) -> SafetensorsInfo:
    """Check that `path` is a complete, well-formed safetensors file; return its header.

    Checked without trusting the file: it exists and is a regular file, the header length
    fits in the file, the header is a JSON object, every tensor has a known dtype, a shape of
    non-negative integers and a byte range inside the data whose length matches dtype x shape;
    with `finite`, every floating-point tensor holds no NaN or infinity. Raises `error` naming
    the file, the problem and `fix`.
    """
    p = Path(path)
    if not p.exists():
        raise _fail(error, p, "file not found", fix)
    if not p.is_file():
        raise _fail(error, p, "not a regular file", fix)
    size = p.stat().st_size
    if size == 0:
        raise _fail(error, p, "the file is empty (0 bytes)", fix)
    if size < 8:
        raise _fail(error, p, f"the file is truncated ({size} bytes; a safetensors file starts with an 8-byte header length)", fix)
    with p.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8:
            raise _fail(
                error, p,
                f"not a complete safetensors file: the header declares {n} bytes but the file has only {size - 8} after it "
                "(truncated, or not a safetensors file)",
                fix,
            )
        if n > _MAX_HEADER:
            raise _fail(error, p, f"the header declares {n} bytes, more than safetensors allows", fix)
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _fail(error, p, "the safetensors header is not valid JSON (damaged, or not a safetensors file)", fix) from None
    if not isinstance(header, dict):
        raise _fail(error, p, "the safetensors header is not a JSON object", fix)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(error, p, "the safetensors metadata is not a map of strings", fix)
    data_len = size - 8 - n
    tensors: dict[str, dict[str, Any]] = {}
    for name, spec in header.items():
        short = name if len(name) <= 120 else name[:117] + "..."
        if not isinstance(spec, dict):
            raise _fail(error, p, f"tensor {short!r}: its header entry is not an object", fix)
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if dtype not in _DTYPE_BYTES:
            raise _fail(error, p, f"tensor {short!r}: unknown dtype {str(dtype)[:40]!r}", fix)
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _fail(error, p, f"tensor {short!r}: shape {str(shape)[:60]} is not a list of non-negative integers", fix)
        if (
            not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise _fail(error, p, f"tensor {short!r}: data_offsets {str(offsets)[:60]} are not two integers", fix)
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise _fail(
                error, p,
                f"tensor {short!r} declares bytes {begin}..{end} but the data section holds only {data_len} bytes "
                "(the file was cut short)",
                fix,
            )
        count = 1
        for d in shape:
            count *= d
        width = _DTYPE_BYTES[dtype]
        if width is not None and end - begin != count * width:
            raise _fail(
                error, p,
                f"tensor {short!r}: {dtype} {shape} needs {count * width} bytes, the header declares {end - begin}",
                fix,
            )
        tensors[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    if finite:
        _check_finite(p, tensors, error, fix)
    return SafetensorsInfo(path=p, tensors=tensors, metadata=dict(metadata))


def _check_finite(p: Path, tensors: dict[str, dict[str, Any]], error: type[WeightsFileError], fix: str) -> None:
    floats = [k for k, spec in tensors.items() if spec["dtype"] in _FLOAT_DTYPES]
    if not floats:
        return
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as fh:
            for key in floats:
                t = fh.get_tensor(key)
                if t.numel() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise _fail(error, p, f"tensor {key[:120]!r} holds {bad} NaN or infinite value(s) of {t.numel()}", fix)
    except WeightsFileError:
        raise
    except Exception as exc:  # the header passed, but the library still refuses the file
        raise _fail(error, p, f"the safetensors library cannot read it ({type(exc).__name__}: {str(exc)[:200]})", fix) from None


def _family(family: str | Family | None) -> Family | None:
    if family is None or not isinstance(family, str):
        return family
    from stunning.families import get_family

    return get_family(family)


def adapter_path(path: str | Path) -> Path:
    """The weights file of an adapter folder (`<folder>/pytorch_lora_weights.safetensors`) or the file itself."""
    p = Path(path)
    return p / LORA_FILE if p.is_dir() else p


def check_adapter(
    path: str | Path,
    family: str | Family | None = None,
    *,
    fix: str = ADAPTER_FIX,
    finite: bool = True,
    error: type[AdapterError] = AdapterError,
) -> Path:
    """Check one LoRA adapter (a folder holding `pytorch_lora_weights.safetensors`, or the file).

    Besides :func:`check_safetensors`: the file holds LoRA down/up weight pairs only in the
    diffusers layout (`<component>.<module>.lora_A.weight`/`lora_B`, or `lora.down`/`lora.up`),
    each down paired with an up of the same rank, for components of `family` (its
    `lora_components`), and its `stunning.family` metadata, if any, names `family`. Returns the file.
    """
    f = adapter_path(path)
    info = check_safetensors(f, error=error, fix=fix, finite=finite)
    fam = _family(family)
    if fam is not None:
        declared = info.metadata.get("stunning.family")
        if declared and declared != fam.name:
            raise _fail(error, f, f"an adapter trained for the {declared!r} family, but the model is {fam.name!r}", fix)
    components = set(fam.lora_components) if fam is not None else None
    downs: dict[tuple[str, str], int] = {}
    ups: dict[tuple[str, str], int] = {}
    for key, spec in info.tensors.items():
        m = _LORA_KEY.match(key)
        comp = m["comp"] if m else (e["comp"] if (e := _LORA_EXTRA.match(key)) else None)
        short = key if len(key) <= 120 else key[:117] + "..."
        if comp is None:
            raise _fail(error, f, f"tensor {short!r} is not a LoRA weight in the diffusers layout (no LoRA adapter?)", fix)
        if components is not None and comp not in components:
            raise _fail(
                error, f,
                f"tensor {short!r} is for component {comp!r}; {fam.name} LoRA files hold {sorted(components)}",
                fix,
            )
        if m is None:
            continue
        shape = spec["shape"]
        if len(shape) < 2:
            raise _fail(error, f, f"tensor {short!r} has shape {shape}; LoRA weights are matrices", fix)
        slot = (m["comp"], m["module"])
        if m["kind"] in _DOWN:
            downs[slot] = shape[0]
        else:
            ups[slot] = shape[1]
    if not downs:
        raise _fail(error, f, "holds no LoRA weights", fix)
    if set(downs) != set(ups):
        odd = sorted(".".join(s) for s in set(downs) ^ set(ups))[:3]
        raise _fail(error, f, f"LoRA down and up weights are not paired (e.g. {odd})", fix)
    bad = sorted(".".join(s) for s in downs if downs[s] != ups[s])[:3]
    if bad:
        raise _fail(error, f, f"LoRA down and up weights disagree on the rank for {bad}", fix)
    if fam is not None and not any(c == fam.lora_component for c, _ in downs):
        raise _fail(error, f, f"holds no LoRA weights for the {fam.name} denoiser ({fam.lora_component!r})", fix)
    return f


def check_adapters(
    paths: Iterable[str | Path],
    family: str | Family | None = None,
    *,
    fix: str = ADAPTER_FIX,
    skip_missing: bool = False,
) -> list[Path]:
    """:func:`check_adapter` for each of `paths` (folders or files); `skip_missing`: leave a
    missing one to the caller's own message. Returns the checked files."""
    fam = _family(family)
    out = []
    for p in paths:
        f = adapter_path(p)
        if skip_missing and not f.exists():
            continue
        out.append(check_adapter(f, fam, fix=fix))
    return out


def check_stage_adapters(params: Any, adapters: str | Path, merged: str | Path | None = None) -> None:
    """The `validate` stage's inputs: each style adapter `adapters/<style>/` and each blend
    `merged/blends/<name>/` of `params` that exists is checked (missing ones are left to the
    stage's own message); raises :class:`AdapterError` naming the file and the stage to re-run."""
    family = _family(params.base.family)
    check_adapters((Path(adapters) / s for s in params.data.styles), family, skip_missing=True)
    if merged is not None:
        blends = (Path(merged) / "blends" / b.name for b in params.merge.blends)
        check_adapters(blends, family, fix=BLEND_FIX, skip_missing=True)


_CHECKPOINT_FILES = ("lora.safetensors", "optimizer.pt", "rng.safetensors", "state.json")


def check_checkpoint(folder: str | Path, *, fix: str = CHECKPOINT_FIX) -> Path:
    """Check a training checkpoint folder (`stunning.training.checkpoint` layout) before loading it.

    Every file is present; `lora.safetensors` is a complete safetensors file of finite LoRA
    parameters; `rng.safetensors` is complete; `optimizer.pt` is a non-empty torch archive;
    `state.json` is a JSON object with an integer `step` and a `loss_history` of that length.
    Raises :class:`CheckpointError`; returns the folder.
    """
    d = Path(folder)
    if not d.is_dir():
        raise _fail(CheckpointError, d, "checkpoint folder not found", fix)
    missing = [name for name in _CHECKPOINT_FILES if not (d / name).is_file()]
    if missing:
        raise _fail(CheckpointError, d, f"incomplete checkpoint (missing {missing})", fix)
    lora = check_safetensors(d / "lora.safetensors", error=CheckpointError, fix=fix)
    if not lora.tensors:
        raise _fail(CheckpointError, d / "lora.safetensors", "holds no tensors", fix)
    odd = sorted(k for k in lora.tensors if "lora" not in k)[:3]
    if odd:
        raise _fail(CheckpointError, d / "lora.safetensors", f"holds non-LoRA parameters (e.g. {odd})", fix)
    check_safetensors(d / "rng.safetensors", error=CheckpointError, fix=fix, finite=False)
    opt = d / "optimizer.pt"
    with opt.open("rb") as fh:
        magic = fh.read(4)
    if magic[:2] != b"PK":  # torch.save writes a zip archive
        raise _fail(CheckpointError, opt, "not a torch archive (empty or damaged)", fix)
    try:
        state = json.loads((d / "state.json").read_text())
    except (UnicodeDecodeError, ValueError):
        raise _fail(CheckpointError, d / "state.json", "not valid JSON", fix) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("loss_history"), list):
        raise _fail(CheckpointError, d / "state.json", "lacks an integer 'step' and a 'loss_history' list", fix)
    if len(state["loss_history"]) != state["step"]:
        raise _fail(
            CheckpointError, d / "state.json",
            f"loss history has {len(state['loss_history'])} entries for step {state['step']}", fix,
        )
    return d
