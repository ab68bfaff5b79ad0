"""Time to the first live preview vs time to the final image, on the shipped micro model.

    python scripts/bench_preview.py [--steps 20] [--runs 5] [--threads 2]
        [--out reports/benchmark_preview.json]

What it does: loads the micro model (`stunning/assets/micro`) as a :class:`StyleModel` with two
random style adapters (``a``, ``b``; as `stunning serve` would hold a champion), then for a
default request (one prompt, `--steps` steps, guidance 4, a request-time blend of both styles)
measures, over `--runs` runs (median, min, max):

- ``first_frame_s``: request start -> the first preview image exists (after step 1: prompt
  encoding, one denoising step, the linear latent-to-RGB projection);
- ``final_image_s``: request start -> the decoded PIL image;
- ``preview_frame_ms``: one preview (projection + upscale to 128 px);
- ``switch_ms``: activating a different request-time blend (PEFT `set_adapters`);

plus, once: the previewer's fit time (``fit_s``; paid on a model's first preview, so the cold
first frame is ``first_frame_s + fit_s``) and a VAE decode of one step's latents for
comparison (``vae_decode_ms``: what a full-decode preview would cost per frame).

A benchmark, not a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _stats(values: list[float], scale: float = 1.0, digits: int = 4) -> dict[str, float]:
    return {"median": round(statistics.median(values) * scale, digits), "min": round(min(values) * scale, digits),
            "max": round(max(values) * scale, digits)}


def _model(work: Path):
    import torch

    from stunning.embedded import SHIPPED
    from stunning.families import get_family
    from stunning.style_model import StyleModel
    from tests.factories import random_lora

    torch.manual_seed(0)
    pipe = get_family("sd3").load_pipeline(SHIPPED, torch.device("cpu"), torch.float32)
    for seed, name in enumerate(("a", "b")):
        random_lora(pipe, work / "adapters" / name, "sd3", seed, scale=0.05)
    (work / "manifest.json").write_text(json.dumps({"family": "sd3", "model_name": "micro-bench"}))
    artifacts = {"manifest": work / "manifest.json", "base": SHIPPED, "adapters": work / "adapters"}
    return StyleModel.load(artifacts, device="cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmark_preview.json")
    args = parser.parse_args(argv)

    import torch

    from stunning.io import write_json
    from stunning.style_model import GenerateRequest

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-preview-") as tmp:
        model = _model(Path(tmp))
        t0 = time.perf_counter()
        previewer = model.previewer()
        fit_s = time.perf_counter() - t0

        weights = [{"a": 0.7, "b": -0.3}, {"a": -0.2, "b": 1.2}]
        first, final, frames, switches = [], [], [], []
        model.generate(GenerateRequest(prompt="a red dress on a white background", steps=2))  # warm-up
        for run in range(args.runs):
            req = GenerateRequest(prompt="a red dress on a white background", seed=run, steps=args.steps,
                                  guidance_scale=4.0, styles=weights[run % 2])
            marks: dict[str, float] = {}

            def on_step(step, total, latents, marks=marks):
                t = time.perf_counter()
                model.preview(latents)
                frames.append(time.perf_counter() - t)
                marks.setdefault("first", time.perf_counter())

            start = time.perf_counter()
            model.generate(req, on_step=on_step)
            final.append(time.perf_counter() - start)
            first.append(marks["first"] - start)
            switches.append(model.last_switch_s)

        latents = torch.randn(1, 4, 16, 16)
        decode = []
        for _ in range(10):
            t = time.perf_counter()
            with torch.no_grad():
                model.pipe.vae.decode(latents / model.pipe.vae.config.scaling_factor)
            decode.append(time.perf_counter() - t)

    report = {
        "model": "micro (stunning/assets/micro), 2 random style adapters, request-time blend",
        "steps": args.steps,
        "runs": args.runs,
        "threads": args.threads,
        "first_frame_s": _stats(first),
        "final_image_s": _stats(final),
        "preview_frame_ms": _stats(frames, 1000, 3),
        "switch_ms": _stats(switches, 1000, 2),
        "fit_s": round(fit_s, 3),
        "fit_rmse": round(previewer.fit_rmse, 4),
        "vae_decode_ms": _stats(decode, 1000, 2),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine skews every figure
        "cpus": os.cpu_count(),
    }
    rows = [("first preview frame", f"{report['first_frame_s']['median']:.3f} s"),
            ("final image", f"{report['final_image_s']['median']:.3f} s"),
            ("preview frame", f"{report['preview_frame_ms']['median']:.3f} ms"),
            ("full VAE decode (for comparison)", f"{report['vae_decode_ms']['median']:.2f} ms"),
            ("blend switch", f"{report['switch_ms']['median']:.2f} ms"),
            ("previewer fit (once per model)", f"{report['fit_s']:.3f} s")]
    print(f"micro model, {args.steps} steps, {args.threads} threads, median of {args.runs} runs "
          f"(load average {report['load_average_1min']} on {report['cpus']} CPUs)")
    for label, value in rows:
        print(f"  {label:<34} {value:>12}")
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
