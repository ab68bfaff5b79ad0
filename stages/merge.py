"""Stage `merge` (phase 6, adapter merge/quantization): blends, a fused model, an int8 denoiser.

For every blend in `merge.blends`, writes the exact weighted sum of the style adapters
(`--adapters`/<style>/) as one diffusers LoRA to `--out`/blends/<name>/; fuses `merge.fuse`
(a blend name or a single style) into the base (`--base`) as a full pipeline at
`--out`/fused/; quantizes that fused denoiser to int8 weights at `--out`/quantized/; and
measures size, peak memory and fidelity of int8 vs float32 on the `validate` prompts and
seeds into `--report` (DVC metrics). `--out` is published in one rename.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path
from typing import Any

from stages._scaffold import parser, run_stage
from stunning.config import ConfigError, Params, dump_resolved

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _user_errors() -> tuple[type[Exception], ...]:
    from stunning.blend import BlendError
    from stunning.checks import AdapterError
    from stunning.families import ModelNotFoundError
    from stunning.quantize import QuantizationError

    return (AdapterError, BlendError, ModelNotFoundError, QuantizationError)


def preflight(params: Params, base: Path, adapters: Path) -> dict[str, Path]:
    """Check names and inputs (adapter files included) before loading any model; return the adapter folder per style."""
    from stunning.blend import LORA_FILE, BlendError
    from stunning.checks import check_adapters
    from stunning.families import check_model_dir, get_family

    try:
        family = get_family(params.base.family)
    except KeyError as exc:
        raise ConfigError(f"base.family: {exc.args[0]}") from None
    for i, b in enumerate(params.merge.blends):
        if not _SAFE_NAME.match(b.name) or b.name in {"fused", "quantized"}:
            raise ConfigError(
                f"merge.blends[{i}].name={b.name!r}: use letters, digits, '.', '_' or '-' (it names a folder)."
            )
    check_model_dir(base, family.required_components)
    needed = {s for b in params.merge.blends for s in b.weights}
    if params.merge.fuse in params.data.styles:
        needed.add(params.merge.fuse)
    dirs = {s: Path(adapters) / s for s in params.data.styles}
    missing = sorted(str(dirs[s] / LORA_FILE) for s in needed if not (dirs[s] / LORA_FILE).is_file())
    if missing:
        raise BlendError(f"adapter weights not found: {missing}. Run the train stage (`dvc repro train`) first.")
    found = {s: d for s, d in dirs.items() if (d / LORA_FILE).is_file()}
    # Header, byte ranges, finite weights and the family's LoRA layout, before any model loads:
    # a damaged adapter is an AdapterError naming the file, not a SafetensorError mid-merge.
    check_adapters(found.values(), family)
    return found


def run(params: Params, base: Path, adapters: Path, out: Path, report: Path, device: str | None = None) -> dict[str, Any]:
    """Blend, fuse, quantize and measure; publish `out` atomically and write `report`."""
    from stunning.blend import blend_adapters, fuse
    from stunning.device import select_device
    from stunning.families import get_family
    from stunning.io import atomic_dir, write_json
    from stunning.quantize import measure, quantize_denoiser

    t0 = time.perf_counter()
    adapter_dirs = preflight(params, Path(base), Path(adapters))
    family = get_family(params.base.family)
    try:
        dev = select_device(device)
    except ValueError as exc:
        raise ConfigError(f"--device: {exc}") from None
    cfg, val = params.merge, params.validate_
    out = Path(out)
    blends: dict[str, Any] = {}
    with atomic_dir(out) as tmp:
        for b in cfg.blends:
            res = blend_adapters(adapter_dirs, b.weights, tmp / "blends" / b.name, name=b.name)
            blends[b.name] = {"rank": max(res.rank.values(), default=0), "layers": res.layers}
        source = tmp / "blends" / cfg.fuse if cfg.fuse in blends else adapter_dirs[cfg.fuse]
        fuse(base, family, source, tmp / "fused")
        qres = quantize_denoiser(tmp / "fused", family, tmp / "quantized", cfg.quantization)
        metrics = measure(tmp / "fused", qres, family, list(val.prompts), list(val.seeds), val.steps, val.guidance_scale, dev)
        dump_resolved(cfg, tmp / "merge_config.yaml")
    summary = {
        **metrics,
        "fused_from": cfg.fuse,
        "fused_kind": "blend" if cfg.fuse in blends else "style",
        "quantization": cfg.quantization,
        "blends": blends,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(Path(report), summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, "--base", "--adapters", "--out", "--report")
    ap.add_argument("--device", default=None, help="device for the fidelity/memory measurement: auto (default), cpu, cuda, mps")
    run_stage(
        "merge",
        ap,
        argv,
        run=lambda params, a: run(params, a.base, a.adapters, a.out, a.report, a.device),
        summary=_print_summary,
        errors=_user_errors,
    )


def _print_summary(s: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"merge: fused {s['fused_kind']} {s['fused_from']!r}, {s['quantization']} denoiser")
    table.add_column("")
    table.add_column("float32", justify="right")
    table.add_column("int8", justify="right")
    table.add_row("denoiser on disk", f"{s['fp32_denoiser_bytes'] / 1e6:.2f} MB", f"{s['int8_denoiser_bytes'] / 1e6:.2f} MB")
    table.add_row("denoiser in memory", f"{s['denoiser_memory_mb_fp32']:.2f} MB", f"{s['denoiser_memory_mb_int8']:.2f} MB")
    table.add_row("peak memory", f"{s['peak_memory_mb_fp32']:.0f} MB", f"{s['peak_memory_mb_int8']:.0f} MB")
    table.add_row("seconds / image", f"{s['latency_s_fp32']:.3f}", f"{s['latency_s_int8']:.3f}")
    console = Console()
    console.print(table)
    for name, b in s["blends"].items():
        console.print(f"blend {name}: rank {b['rank']}, {b['layers']} layers", highlight=False)
    console.print(
        f"size ratio {s['size_ratio']:.3f}; int8 vs float32 pixel MSE {s['quantization_mse']:.2e} "
        f"(max abs {s['quantization_max_abs']:.3f}) on {s['fidelity_images']} images ({s['device']}); "
        f"{s['seconds']:.1f} s -> {args.out}, {args.report}",
        highlight=False,
    )


if __name__ == "__main__":
    main()
