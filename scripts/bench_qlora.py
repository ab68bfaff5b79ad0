"""Benchmark QLoRA: LoRA training on an fp32 / bf16 / int8 / int4 frozen base, and the research
phase's memory prediction for each.

    python scripts/bench_qlora.py [--steps 20] [--last 5] [--models micro sd-unet]
        [--precisions fp32 bf16 int8 int4] [--out reports/bench_qlora.json]

Trains one style adapter on the embedded sample set (curated, 32 px) with the shipped
params.yaml `train` settings (rank, targets, batch size; `--steps` steps, sampling and
checkpoints off) for the shipped micro model (sd3 layout) and a tiny random SD-1.5-layout
UNet (`stunning.tiny`, with its family's default LoRA targets), at each `train.base_precision`.
Each run is a fresh subprocess (the peak is that run's own, not inflated by earlier ones).

Reported per run: peak memory (the trainer's probe, `stunning.device.PeakMemory`: on a CPU the
process RSS high-water mark, framework included), steps/s of the optimisation loop, the final
loss (mean of the last `--last` losses) and its gap to the fp32 run of the same model (same
seed, same data: the gap is the quantization's effect on the curve), and the research phase's
training-memory prediction for the same folder, batch, targets, precision and device
(`stunning.research.training_estimate`) with predicted / measured. A benchmark, not a test:
speed on a shared machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchmark_training import curated_sample  # noqa: E402  the same curated sample set

from stunning.io import write_json  # noqa: E402

PRECISIONS = ("fp32", "bf16", "int8", "int4")
MODELS = ("micro", "sd-unet")


def train_config(family: str, steps: int, precision: str):
    """params.yaml's `train` section with `steps`, the base precision, sampling/checkpoints off."""
    from stunning.config import load_params
    from stunning.families import get_family

    cfg = load_params(REPO / "params.yaml").train
    update = {"steps": steps, "base_precision": precision, "checkpoint_every": 10**6, "sample_every": 0,
              "thermal_check_every": 0}
    if family != "sd3":  # params.yaml's targets are sd3's: other families train their own defaults
        update["target_modules"] = list(get_family(family).default_lora_targets)
    return cfg.model_copy(update=update)


def run_one(spec: dict) -> dict:
    """One training run in this process; its measurements."""
    from stunning.training.trainer import train_style

    cfg = train_config(spec["family"], spec["steps"], spec["precision"])
    s = train_style(Path(spec["model"]), spec["family"], Path(spec["data"]), "noir", cfg, Path(spec["out"]), None,
                    None, "cpu", sample_seeds=(), progress=False)
    return {"peak_memory_mb": s["peak_memory_mb"], "steps_per_s": s["steps_per_s"], "losses": s["loss_history"],
            "base_precision": s["base_precision"], "mixed_precision": s["mixed_precision"],
            "batch_size": s["batch_size"]}


def predicted_mb(model: Path, family: str, steps: int, precision: str) -> float:
    """The research phase's training-memory estimate (MB) for this run."""
    from stunning import research
    from stunning.config import ResearchCandidate

    cfg = train_config(family, steps, precision)
    info = research.size_candidate(ResearchCandidate(name="bench", path=str(model)), cfg.rank, cfg.target_modules,
                                   cfg.target_blocks)
    return research.training_estimate(info, precision, "cpu", cfg.batch_size)["training_gb"] * 1024


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--last", type=int, default=5, help="final loss = mean of the last N steps' losses")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    ap.add_argument("--out", type=Path, default=Path("reports/bench_qlora.json"))
    ap.add_argument("--run-one", help=argparse.SUPPRESS)  # internal: one run, in a subprocess
    args = ap.parse_args(argv)
    if args.run_one:
        spec = json.loads(args.run_one)
        Path(spec["result"]).write_text(json.dumps(run_one(spec)))
        return
    if args.steps < 1 or not 1 <= args.last <= args.steps:
        ap.error("--steps must be >= 1 and --last between 1 and --steps")

    import torch

    from stunning.embedded import SHIPPED
    from stunning.tiny import build_tiny

    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-qlora-") as tmp:
        tmp = Path(tmp)
        data = curated_sample(tmp / "data")
        paths = {"micro": ("sd3", SHIPPED), "sd-unet": ("sd-unet", None)}
        for label in args.models:
            family, path = paths[label]
            path = path or build_tiny(tmp / label, family)
            fp32_loss = None
            for precision in ("fp32", *[p for p in args.precisions if p != "fp32"]):
                result = tmp / f"result-{label}-{precision}.json"
                spec = {"model": str(path), "family": family, "data": str(data), "out": str(tmp / f"out-{label}-{precision}"),
                        "steps": args.steps, "precision": precision, "result": str(result)}
                proc = subprocess.run([sys.executable, __file__, "--run-one", json.dumps(spec)], env=env,
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{label} {precision}: training failed (exit {proc.returncode}):\n"
                                     f"{proc.stderr[-4000:]}")
                r = json.loads(result.read_text())
                final = sum(r["losses"][-args.last:]) / args.last
                if precision == "fp32":
                    fp32_loss = final
                predicted = predicted_mb(Path(path), family, args.steps, precision)
                row = {"model": label, "family": family, "precision": precision, "mixed_precision": r["mixed_precision"],
                       "batch_size": r["batch_size"], "peak_memory_mb": round(r["peak_memory_mb"], 1),
                       "steps_per_s": round(r["steps_per_s"], 2), "final_loss": round(final, 5),
                       "loss_gap_vs_fp32": round(final - fp32_loss, 5),
                       "loss_gap_vs_fp32_pct": round(100 * (final - fp32_loss) / fp32_loss, 2),
                       "predicted_mb": round(predicted, 1), "predicted_over_measured": round(predicted / r["peak_memory_mb"], 3)}
                if precision in args.precisions:
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    report = {"steps": args.steps, "last": args.last, "device": "cpu", "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "seconds": round(time.perf_counter() - t_start, 1), "rows": rows}
    write_json(args.out, report)
    print("\n| model | base | peak MB | steps/s | final loss | gap vs fp32 | predicted MB | pred/meas |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['precision']} | {r['peak_memory_mb']:.0f} | {r['steps_per_s']:.2f} | "
              f"{r['final_loss']:.4f} | {r['loss_gap_vs_fp32']:+.4f} ({r['loss_gap_vs_fp32_pct']:+.1f} %) | "
              f"{r['predicted_mb']:.0f} | {r['predicted_over_measured']:.2f} |")
    print(f"written: {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
