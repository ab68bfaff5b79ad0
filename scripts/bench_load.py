"""Load test of `stunning serve`: the real server under uvicorn, many clients, limits engaged.

    python scripts/bench_load.py [--requests 200] [--clients 16] [--model tiny|micro]
        [--keys 4] [--rate-per-minute 120] [--burst 4] [--max-queue 4] [--steps 2]
        [--stream-every 8] [--honour-retry-after 1.0] [--out reports/benchmark_load.json]

What it does: builds a throwaway project (the tiny random sd3 model, or the shipped micro
model, with one random `noir` style adapter registered as `@champion`), creates `--keys` API
keys, starts the real server (uvicorn, in a subprocess, on 127.0.0.1 and a free port, auth
on) with a small per-key rate limit and a small job queue, then fires `--requests` requests
from `--clients` concurrent clients (threads with httpx; client i uses key i mod --keys;
every `--stream-every`-th request goes to `/generate/stream`), so that some answers are 429
(rate) and some 503 (queue full); a refused client waits as `Retry-After` says (capped at
`--honour-retry-after` seconds) before its next request. Latency is per answer (a refusal
is an answer). Reported: latency p50/p95 (all answers, and 200s only),
counts by status, the server's own /metrics totals. It fails (exit 1) on any 5xx other than
503, and on any 429/503 without an integer `Retry-After`.

A benchmark, not a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MODEL_NAME = "bench-load"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def build_project(root: Path, model: str) -> None:
    """A registry in `root` with `bench-load` v1 (base + one random style) as @champion."""
    import torch

    from stunning.config import RegistryConfig
    from stunning.families import get_family
    from stunning.registry import register_candidate
    from tests.factories import random_lora

    if model == "micro":
        from stunning.embedded import SHIPPED as base
    else:
        from stunning.tiny import build_tiny

        base = build_tiny(root / "tiny-sd3", family="sd3", seed=0)
    pipe = get_family("sd3").load_pipeline(base, torch.device("cpu"), torch.float32)
    random_lora(pipe, root / "candidate/adapters/noir", "sd3", 1, scale=0.5)
    gate = {"passed": True, "checks": [], "reasons": [], "candidate": {}}
    result = register_candidate(RegistryConfig(model_name=MODEL_NAME), gate, {"adapters": root / "candidate/adapters"},
                                base, "sd3", {}, root=root)
    assert result["promoted"], result


def serve(root: Path, port: int, settings_json: str) -> None:
    """The server subprocess: `create_app` under uvicorn on 127.0.0.1."""
    import uvicorn

    from stunning.config import RegistryConfig
    from stunning.serve import ServeSettings, create_app

    settings = ServeSettings(**{**json.loads(settings_json), "keys_path": root / "studio/keys.json"})
    app = create_app(None, RegistryConfig(model_name=MODEL_NAME), root=root, device="cpu", settings=settings)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", choices=("tiny", "micro"), default="tiny")
    ap.add_argument("--keys", type=int, default=4)
    ap.add_argument("--rate-per-minute", type=float, default=120.0)
    ap.add_argument("--burst", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--honour-retry-after", type=float, default=1.0, metavar="MAX_S",
                    help="after a 429/503 a client waits Retry-After seconds, at most this (0: retries at once)")
    ap.add_argument("--stream-every", type=int, default=8, help="every n-th request streams (0: none)")
    ap.add_argument("--out", type=Path, default=REPO / "reports/benchmark_load.json")
    ap.add_argument("--_serve", nargs=3, metavar=("ROOT", "PORT", "SETTINGS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._serve:
        serve(Path(args._serve[0]), int(args._serve[1]), args._serve[2])
        return 0

    import httpx

    from stunning.studio.keys import KeyStore

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="bench-load-"))
    t0 = time.perf_counter()
    build_project(root, args.model)
    keys = [KeyStore(root / "studio/keys.json").create(f"client-{i}")[1] for i in range(args.keys)]
    setup_s = time.perf_counter() - t0
    port = _free_port()
    settings = {"auth": True, "rate_per_minute": args.rate_per_minute, "burst": args.burst,
                "max_pending": args.max_queue, "poll_seconds": 5.0}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    server = subprocess.Popen(
        [sys.executable, __file__, "--_serve", str(root), str(port), json.dumps(settings)], env=env,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not become ready (exit code {server.poll()})")
            time.sleep(0.2)

        lock = threading.Lock()
        counter = iter(range(args.requests))
        results: list[dict] = []

        def client(i: int) -> None:
            headers = {"Authorization": f"Bearer {keys[i % len(keys)]}"}
            with httpx.Client(base_url=base_url, headers=headers, timeout=120) as http:
                while True:
                    with lock:
                        n = next(counter, None)
                    if n is None:
                        return
                    stream = bool(args.stream_every) and n % args.stream_every == args.stream_every - 1
                    body = {"prompt": f"a red dress, take {n}", "seed": n, "steps": args.steps, "style": "noir"}
                    start = time.perf_counter()
                    r = http.post("/generate/stream" if stream else "/generate", json=body)
                    elapsed = time.perf_counter() - start
                    final = None
                    if stream and r.status_code == 200:
                        final = r.text.strip().split("\n\n")[-1].split("\n", 1)[0].removeprefix("event: ")
                    if r.status_code in (429, 503) and args.honour_retry_after > 0:
                        # a polite client waits as told (capped, so the benchmark stays short)
                        retry = r.headers.get("retry-after", "1")
                        time.sleep(min(float(retry) if retry.isdigit() else 1.0, args.honour_retry_after))
                    with lock:
                        results.append({
                            "n": n, "client": i, "endpoint": "stream" if stream else "generate",
                            "status": r.status_code, "latency_s": elapsed, "retry_after": r.headers.get("retry-after"),
                            "model_version": r.headers.get("x-model-version"), "stream_final": final,
                        })

        t_load = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_load
        metrics_text = httpx.get(f"{base_url}/metrics", timeout=10).text
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    statuses = Counter(r["status"] for r in results)
    latencies = [r["latency_s"] for r in results]
    ok = [r["latency_s"] for r in results if r["status"] == 200]
    bad_5xx = [r for r in results if r["status"] >= 500 and r["status"] != 503]
    missing_retry = [r for r in results if r["status"] in (429, 503)
                     and not (r["retry_after"] or "").isdigit()]
    images = next((float(line.split()[-1]) for line in metrics_text.splitlines()
                   if line.startswith("stunning_images_generated_total")), None)
    report = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "config": {**{k: v for k, v in vars(args).items() if k not in ("out", "_serve")}, "server": settings},
        "setup_s": round(setup_s, 2),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(results) / wall, 2) if wall else None,
        "requests": len(results),
        "by_status": {str(k): v for k, v in sorted(statuses.items())},
        "by_endpoint": dict(Counter(f"{r['endpoint']} {r['status']}" for r in results)),
        "latency_s": {
            "all": {"p50": _percentile(latencies, 50), "p95": _percentile(latencies, 95),
                    "mean": statistics.fmean(latencies) if latencies else None},
            "ok_200": {"p50": _percentile(ok, 50), "p95": _percentile(ok, 95), "max": max(ok) if ok else None},
        },
        "stream_final_events": dict(Counter(r["stream_final"] for r in results if r["stream_final"])),
        "server_images_generated": images,
        "model_versions": sorted({r["model_version"] for r in results if r["model_version"]}),
        "checks": {"unexpected_5xx": len(bad_5xx), "429_or_503_without_retry_after": len(missing_retry)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("requests", "by_status", "latency_s", "wall_s", "throughput_rps",
                                              "stream_final_events", "checks")}, indent=2))
    print(f"report: {args.out}")
    failed = []
    if bad_5xx:
        failed.append(f"{len(bad_5xx)} answers were 5xx other than 503: {sorted({r['status'] for r in bad_5xx})}")
    if missing_retry:
        failed.append(f"{len(missing_retry)} answers 429/503 lacked an integer Retry-After")
    if len(results) != args.requests:
        failed.append(f"{args.requests - len(results)} requests got no answer")
    for message in failed:
        print(f"FAIL: {message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
