"""Benchmark the LoRA trainer: steps/s and peak memory per family, with and without the encoding cache.

    python scripts/benchmark_training.py [--steps 60] [--batch-size 4] [--device cpu]
        [--families sd-unet sdxl ...] [--no-micro] [--mixed-precision no]
        [--out reports/benchmark_training.json]

For every registered family that can build a tiny model (``stunning.families.available()``
that ``stunning.tiny.BUILDERS`` has a builder for, so a new family is picked up without
changing this script) and for the shipped micro model (sd3 layout), it trains one style adapter on the
embedded sample set three times: without the disk cache, with a cold cache (encodes and
writes) and with a warm cache (reads). Each run is a fresh subprocess, so the peak memory of
one run is not inflated by what earlier runs left in the process.

Reported per run: steps per second of the optimisation loop (the trainer's own
``steps_per_s``), wall seconds of ``train_style`` (loading, encoding, training, val loss,
saving) and of the whole subprocess (plus interpreter start-up and imports), peak memory
(the process high-water mark on a CPU), and next to it the training memory the research
phase predicts for the same model folder (``stunning.research``: its heuristic at batch 1,
the family's default LoRA targets, the precision the run used, at the resolution research
infers from the model's config, which is also reported). A benchmark, not a test: numbers
depend on the machine and its load.
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

MODES = ("no cache", "cache cold", "cache warm")
RESEARCH_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}  # train.mixed_precision -> research precision


def curated_sample(root: Path) -> Path:
    from stunning.config import Params
    from stunning.data.curate import curate
    from stunning.data.ingest import ingest
    from stunning.data.sample import generate_sample

    params = Params()
    generate_sample(root / "sample", params.data)
    ingest(root / "sample", root / "ingested", params.data)
    curate(root / "ingested", root / "curated", params.data, params.curate, validate=False)
    return root / "curated"


def has_tiny_build(family: str) -> bool:
    """Whether ``stunning.tiny.build_tiny`` can build `family` (without building)."""
    from stunning.tiny import BUILDERS

    return family in BUILDERS


def select_families(requested: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """(families to benchmark, {family: why skipped}). Requested names must be registered and buildable."""
    from stunning.families import available

    known = available()
    if requested:
        unknown = [f for f in requested if f not in known]
        if unknown:
            raise SystemExit(f"--families: unknown {unknown}; registered families: {known}")
        missing = [f for f in requested if not has_tiny_build(f)]
        if missing:
            raise SystemExit(f"--families: {missing} cannot build a tiny model (no builder in "
                             "stunning.tiny.BUILDERS); leave them out")
        return list(dict.fromkeys(requested)), {}
    chosen = [f for f in known if has_tiny_build(f)]
    return chosen, {f: "no tiny builder (stunning.tiny.BUILDERS)" for f in known if f not in chosen}


def predicted_training(model_dir: Path, family: str, rank: int, precision: str) -> dict:
    """The research phase's training-memory estimate (MB) for `model_dir`, and the resolution it assumes."""
    from stunning import research
    from stunning.config import ResearchCandidate
    from stunning.families import get_family

    targets = tuple(get_family(family).default_lora_targets)
    cand = research.size_candidate(ResearchCandidate(name="bench", path=str(model_dir)), lora_rank=rank,
                                   targets=targets)
    shape = research.DenoiserShape(**cand["shape"])
    mem = research.estimate_memory(
        cand["total_params"], cand["lora"]["params"], shape, cand["resolution"], cand["vae_width"], precision
    )
    return {"predicted_training_mb": round(mem["training_gb"] * 1024, 1),
            "predicted_resolution": cand["resolution"], "predicted_lora_params": cand["lora"]["params"]}


def run_one(spec: dict) -> dict:
    """One training run (in this process); the measurements of it."""
    from stunning.config import TrainConfig
    from stunning.families import get_family
    from stunning.training.trainer import train_style

    # rank 4 (what predicted_training sizes), lr 1e-3 and no caption dropout: the settings the
    # published figures were measured with (TrainConfig's defaults are now params.yaml's).
    cfg = TrainConfig(steps=spec["steps"], batch_size=spec["batch_size"], checkpoint_every=10**6,
                      rank=4, alpha=4.0, learning_rate=1e-3, caption_dropout=0.0,
                      mixed_precision=spec["mixed_precision"],
                      target_modules=get_family(spec["family"]).default_lora_targets)
    t0 = time.perf_counter()
    s = train_style(Path(spec["model"]), spec["family"], Path(spec["data"]), "noir", cfg, Path(spec["out"]), None,
                    None, spec["device"], sample_seeds=(), progress=False,
                    cache_dir=Path(spec["cache"]) if spec["cache"] else None)
    return {"steps_per_s": s["steps_per_s"], "wall_s": time.perf_counter() - t0, "peak_memory_mb": s["peak_memory_mb"],
            "device": s["device"], "mixed_precision": s["mixed_precision"], "batch_size": s["batch_size"],
            "n_images": s["n_images"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mixed-precision", default="no", choices=["auto", "no", "fp16", "bf16"],
                    help="train.mixed_precision of every run (default no: fp32, as research predicts on a CPU)")
    ap.add_argument("--families", nargs="+", help="only these families (default: every registered one with a tiny build)")
    ap.add_argument("--no-micro", action="store_true", help="leave out the shipped micro model (sd3 layout)")
    ap.add_argument("--out", type=Path, default=Path("reports/benchmark_training.json"))
    ap.add_argument("--run-one", help=argparse.SUPPRESS)  # internal: one run, in a subprocess
    args = ap.parse_args(argv)
    if args.run_one:
        spec = json.loads(args.run_one)
        Path(spec["result"]).write_text(json.dumps(run_one(spec)))
        return
    if args.steps < 1 or args.batch_size < 1:
        ap.error("--steps and --batch-size must be at least 1")

    import torch

    from stunning.embedded import SHIPPED
    from stunning.tiny import build_tiny

    families, skipped = select_families(args.families)
    for fam, why in skipped.items():
        print(f"skipped {fam}: {why}", flush=True)
    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        data = curated_sample(tmp / "data")
        trained_px = curated_resolution(data)
        models = {f"{name} (tiny, random)": (name, build_tiny(tmp / name, name)) for name in families}
        if "sd3" in families and not args.no_micro:
            models["sd3 (micro, shipped)"] = ("sd3", SHIPPED)
        for label, (family, path) in models.items():
            predictions: dict[str, dict] = {}
            for mode in MODES:
                cache = None if mode == "no cache" else tmp / f"cache-{label.split()[0]}-{Path(path).name}"
                result_file = tmp / f"result-{len(rows)}.json"
                spec = {"model": str(path), "family": family, "data": str(data), "out": str(tmp / f"out-{len(rows)}"),
                        "cache": str(cache) if cache else None, "steps": args.steps, "batch_size": args.batch_size,
                        "mixed_precision": args.mixed_precision, "device": args.device, "result": str(result_file)}
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--run-one", json.dumps(spec)], env=env,
                                      capture_output=True, text=True)
                process_s = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise SystemExit(f"{label}, {mode}: training failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
                r = json.loads(result_file.read_text())
                precision = RESEARCH_PRECISION.get(r["mixed_precision"], "fp32")
                if precision not in predictions:
                    predictions[precision] = predicted_training(Path(path), family, 4, precision)
                rows.append({
                    "model": label, "family": family, "mode": mode, "device": r["device"],
                    "mixed_precision": r["mixed_precision"], "batch_size": r["batch_size"], "n_images": r["n_images"],
                    "steps_per_s": None if r["steps_per_s"] is None else round(r["steps_per_s"], 2),
                    "wall_s": round(r["wall_s"], 2), "process_s": round(process_s, 2),
                    "peak_memory_mb": round(r["peak_memory_mb"], 1), "trained_resolution": trained_px,
                    **predictions[precision],
                })
                print(json.dumps(rows[-1]), flush=True)
    report = {"steps": args.steps, "batch_size": args.batch_size, "mixed_precision": args.mixed_precision,
              "torch": torch.__version__, "cpu_count": os.cpu_count(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "skipped": skipped, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    tmp_out.replace(args.out)
    print(f"\n{'model':22} {'mode':10} {'prec':4} {'steps/s':>8} {'wall s':>7} {'proc s':>7} {'peak MB':>8} "
          f"{'predicted MB':>13} {'at px':>6}")
    for r in rows:
        sps = "n/a" if r["steps_per_s"] is None else f"{r['steps_per_s']:.2f}"
        print(f"{r['model']:22} {r['mode']:10} {r['mixed_precision']:4} {sps:>8} {r['wall_s']:7.2f} "
              f"{r['process_s']:7.2f} {r['peak_memory_mb']:8.1f} {r['predicted_training_mb']:13.1f} "
              f"{r['predicted_resolution']:6}")
    print(f"written: {args.out}")


def curated_resolution(data: Path) -> int:
    """The side of the curated training images (the resolution trained at)."""
    import csv

    from PIL import Image

    with (data / "manifest.csv").open() as fh:
        first = next(csv.DictReader(fh))
    return max(Image.open(data / first["path"]).size)


if __name__ == "__main__":
    main()
