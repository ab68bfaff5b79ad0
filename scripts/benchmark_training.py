"""Benchmark the LoRA trainer: steps/s and peak memory per family, with and without the encoding cache.

    python scripts/benchmark_training.py [--steps 60] [--batch-size 4] [--device cpu] [--families sdxl flux]
                                         [--out reports/benchmark_training.json]

For each registered family's tiny configuration (``stunning.embedded.build_tiny``) and for the shipped
micro model, it trains one style adapter on the embedded sample set three times: without
the disk cache, with a cold cache (encodes and writes) and with a warm cache (reads). It
prints and writes steps per second of the optimisation loop, wall seconds of the whole run
(loading and encoding included) and peak memory, next to the training memory the research
phase predicts for the same model (``stunning.research``; batch 1 of its heuristic, fp32 on
a CPU). A benchmark, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


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


def predicted_training_gb(model_dir: Path, rank: int, precision: str) -> float:
    from stunning import research
    from stunning.config import ResearchCandidate

    cand = research.size_candidate(ResearchCandidate(name="bench", path=str(model_dir)), lora_rank=rank)
    shape = research.DenoiserShape(**cand["shape"])
    mem = research.estimate_memory(
        cand["total_params"], cand["lora"]["params"], shape, cand["resolution"], cand["vae_width"], precision
    )
    return mem["training_gb"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("reports/benchmark_training.json"))
    ap.add_argument("--families", nargs="*", help="only these families (default: every registered one)")
    args = ap.parse_args(argv)

    import torch

    from stunning.config import TrainConfig
    from stunning.embedded import SHIPPED, build_tiny
    from stunning.families import available, get_family
    from stunning.training.lora import train_style

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        data = curated_sample(tmp / "data")
        families = args.families or available()
        models = {f"{name} (tiny, random)": (name, build_tiny(tmp / name, name)) for name in families}
        if "sd3" in families:
            models["sd3 (micro, shipped)"] = ("sd3", SHIPPED)
        precision = "fp32" if args.device == "cpu" else "bf16"
        for label, (family, path) in models.items():
            # Each family's default LoRA targets, as a user of that family would train.
            cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, checkpoint_every=10**6,
                              target_modules=get_family(family).default_lora_targets)
            for mode in ("no cache", "cache cold", "cache warm"):
                cache = None if mode == "no cache" else tmp / f"cache-{family}-{path.name}"
                t0 = time.perf_counter()
                s = train_style(path, family, data, "noir", cfg, tmp / "out", None, None, args.device,
                                sample_seeds=(), progress=False, cache_dir=cache)
                rows.append({
                    "model": label, "mode": mode, "device": s["device"],
                    "steps_per_s": round(s["steps_per_s"], 2), "wall_s": round(time.perf_counter() - t0, 2),
                    "peak_memory_mb": round(s["peak_memory_mb"], 1),
                    "predicted_training_mb": round(predicted_training_gb(Path(path), cfg.rank, precision) * 1024, 1),
                })
                print(json.dumps(rows[-1]), flush=True)
    report = {"steps": args.steps, "batch_size": args.batch_size, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'model':24} {'mode':11} {'steps/s':>8} {'wall s':>7} {'peak MB':>8} {'predicted MB':>13}")
    for r in rows:
        print(f"{r['model']:24} {r['mode']:11} {r['steps_per_s']:8.2f} {r['wall_s']:7.2f} "
              f"{r['peak_memory_mb']:8.1f} {r['predicted_training_mb']:13.1f}")


if __name__ == "__main__":
    main()
