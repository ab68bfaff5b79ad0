"""Stage `train` (phase 5, training): one LoRA adapter per style, one MLflow run each.

Trains every style in `data.styles` in sequence on the curated data (`--data`), from the
base model folder (`--base`, `${base.path}`), with the `train` section of params.yaml.
Writes the adapters (`--out`/<style>/, diffusers LoRA layout + `train_config.yaml`,
published together in one rename), the metrics JSON (`--metrics`), the loss curves as a
wide CSV (`--plots`: `step,<style>,...`, for `dvc plots`) and as a PNG (`--plot-image`,
readable without DVC's HTML viewer), and the final sample images (`--samples`). Checkpoints
go to `--checkpoints` and are reused: an interrupted run resumes where it stopped. The
metrics carry each style's batch size (`train.batch_size: auto` resolved, after any halving
for lack of memory) and the seconds the thermal guard paused for heat. Training that diverges
(non-finite loss) even after `train.max_divergence_retries` rollbacks at half the learning rate
exits 2 with what to change and writes no adapter.

`train.base_precision` sets the frozen base's precision (QLoRA: int8/int4 quantize the
denoiser, the adapter stays float32); `auto` takes the plan of the research report
(`--research`, `reports/research.json`). The precision each style trained at is in the metrics
(`base_precision`), the adapter's metadata and the MLflow run's params.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
from pathlib import Path
from typing import Any

from stages._scaffold import parser, run_stage
from stunning.config import ConfigError, Params
from stunning.families import ModelNotFoundError
from stunning.io import atomic_dir, atomic_write_bytes, atomic_write_text, write_json
from stunning.mlflow_store import TrackingStoreError
from stunning.training.batch import BatchSizeError
from stunning.training.dataset import DatasetError
from stunning.training.divergence import TrainingDiverged

log = logging.getLogger(__name__)

METRIC_KEYS = (
    "final_loss",
    "val_loss",
    "base_val_loss",
    "steps",
    "steps_per_s",
    "images_per_s",
    "peak_memory_mb",
    "mlflow_run_id",
    "seconds",
    "resumed_from_step",
    "batch_size",
    "batch_backoffs",
    "thermal_paused_s",
    "thermal_throttled_checks",
    "base_precision",
)


def read_research(path: Path | None) -> dict[str, Any] | None:
    """The research report at `path` (None: no path given); ConfigError if it is missing or not JSON."""
    import json

    if path is None:
        return None
    if not path.is_file():
        raise ConfigError(f"--research {path}: no such file; run the research stage first (dvc repro research).")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--research {path} is not valid JSON ({exc}); rerun the research stage.") from None
    if not isinstance(report, dict):
        raise ConfigError(f"--research {path} is not a research report (a JSON object with a 'plan').")
    return report


def preflight(
    params: Params, base: Path, data: Path, device: str | None, research: dict[str, Any] | None = None,
    research_path: Path | None = None,
) -> None:
    """Fail on bad input before any model is loaded or any run is recorded."""
    from stunning.device import select_device
    from stunning.families import get_family
    from stunning.training.dataset import CuratedDataset
    from stunning.training.quantized import resolve_base_precision

    try:
        family = get_family(params.base.family)
    except KeyError as exc:
        raise ConfigError(f"base.family: {exc.args[0]}") from None
    from stunning.families import check_model_dir

    check_model_dir(base, family.required_components)
    for style in params.data.styles:
        CuratedDataset(data, style, "train")
    try:
        dev = select_device(device)
    except ValueError as exc:
        raise ConfigError(f"--device: {exc}") from None
    # train.mixed_precision and train.base_precision (auto: the research plan's) on this device.
    resolve_base_precision(params.train, dev, research, str(research_path))


def loss_table(histories: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Wide rows `{"step", <style>: loss, ...}`; a style with fewer steps leaves blanks."""
    n = max((len(h) for h in histories.values()), default=0)
    return [
        {"step": i + 1, **{s: (round(h[i], 6) if i < len(h) else "") for s, h in histories.items()}} for i in range(n)
    ]


def write_loss_csv(path: Path, histories: dict[str, list[float]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", *histories], lineterminator="\n")
    writer.writeheader()
    writer.writerows(loss_table(histories))
    atomic_write_text(path, buf.getvalue())


def write_loss_png(path: Path, histories: dict[str, list[float]]) -> None:
    """Raw per-step losses (faint) and their moving average (bold), one colour per style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, (style, hist) in enumerate(histories.items()):
        colour = f"C{i}"
        steps = np.arange(1, len(hist) + 1)
        ax.plot(steps, hist, color=colour, alpha=0.25, linewidth=0.8)
        window = max(1, min(10, len(hist) // 5))
        smooth = np.convolve(hist, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color=colour, linewidth=2, label=f"{style} (avg of {window})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (MSE)")
    ax.set_title("LoRA training loss per style")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run(
    params: Params,
    base: Path,
    data: Path,
    out: Path,
    metrics: Path,
    plots: Path,
    checkpoints: Path,
    *,
    plot_image: Path | None = None,
    samples: Path | None = None,
    device: str | None = None,
    tracker=None,
    research: Path | None = None,
) -> dict[str, Any]:
    """Train all styles; write adapters, metrics, plots; return `{"styles": {...}}`.

    `research` is the research report (`train.base_precision: auto` trains at its plan's precision)."""
    from stunning.families import get_family
    from stunning.training.trainer import train_style

    research_report = read_research(research)
    preflight(params, base, data, device, research_report, research)
    if tracker is None:
        from stunning.tracking import MlflowTracker, configure_mlflow

        configure_mlflow(params.registry)
        tracker = MlflowTracker()
    family = get_family(params.base.family)

    results: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[float]] = {}
    samples_ctx = atomic_dir(samples) if samples is not None else contextlib.nullcontext(None)
    with atomic_dir(out) as tmp_out, samples_ctx as tmp_samples:
        for style in params.data.styles:
            log.info("training style %r (%d steps)", style, params.train.steps)
            summary = train_style(
                base,
                family,
                data,
                style,
                params.train,
                tmp_out,
                tracker,
                checkpoints,
                device,
                samples_dir=tmp_samples,
                # Encoded images/captions, keyed by content: shared by styles and reruns.
                cache_dir=checkpoints / "_encodings",
                research=research_report,
                research_source=str(research),
            )
            histories[style] = summary["loss_history"]
            results[style] = {k: summary[k] for k in METRIC_KEYS}
            if summary.get("divergence_retries"):  # recovered at a lower learning rate
                results[style].update(divergence_retries=summary["divergence_retries"],
                                      learning_rate_final=summary["learning_rate_final"])

    report = {
        "styles": {
            s: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for s, r in results.items()
        }
    }
    write_json(metrics, report)
    write_loss_csv(plots, histories)
    write_loss_png(plot_image or plots.with_suffix(".png"), histories)
    return report


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, "--base", "--data", "--out", "--metrics", "--plots", "--plot-image", "--samples", "--checkpoints")
    ap.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    ap.add_argument("--research", type=Path, default=None,
                    help="research report (reports/research.json): its plan is train.base_precision auto's precision")
    run_stage(
        "train",
        ap,
        argv,
        # the summary reads params too (whether the batch size was "auto")
        run=lambda params, a: (
            run(
                params, a.base, a.data, a.out, a.metrics, a.plots, a.checkpoints,
                plot_image=a.plot_image, samples=a.samples, device=a.device, research=a.research,
            ),
            params,
        ),
        summary=lambda result, a: _print_summary(*result, a),
        # TrainingDiverged: non-finite loss even after the retries at lower learning rates (exit 2
        # with what to change, and no adapter, so merge/validate/handoff never see one).
        # TrackingStoreError: a corrupt or locked mlflow.db (the message says how to recover).
        errors=(ModelNotFoundError, DatasetError, BatchSizeError, TrainingDiverged, TrackingStoreError),
    )


def _print_summary(report: dict[str, Any], params: Params, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(v: Any, spec: str = ".4f") -> str:
        return "n/a" if v is None else format(v, spec)

    table = Table(title="LoRA training", caption="val: fixed-noise loss on the val split; base: without the adapter")
    table.add_column("style", no_wrap=True, min_width=max(len(s) for s in report["styles"]))
    for col in ("steps", "base", "loss", "val", "base val", "steps/s", "peak MB", "time s"):
        table.add_column(col, justify="right")
    for style, r in report["styles"].items():
        table.add_row(
            style,
            str(r["steps"]),
            str(r.get("base_precision", "n/a")),
            fmt(r["final_loss"]),
            fmt(r["val_loss"]),
            fmt(r["base_val_loss"]),
            fmt(r["steps_per_s"], ".1f"),
            fmt(r["peak_memory_mb"], ".0f"),
            fmt(r["seconds"], ".1f"),
        )
    console = Console()
    console.print(table)
    resumed = [f"{s} at step {r['resumed_from_step']}" for s, r in report["styles"].items() if r["resumed_from_step"]]
    if resumed:
        console.print(f"resumed from checkpoints in {args.checkpoints}: " + ", ".join(resumed))
    backed_off = [f"{s} {r['batch_backoffs']}x" for s, r in report["styles"].items() if r["batch_backoffs"]]
    if params.train.batch_size == "auto" or backed_off:
        console.print("batch size: " + ", ".join(f"{s} {r['batch_size']}" for s, r in report["styles"].items()))
    if backed_off:
        console.print("ran out of memory and halved the batch: " + ", ".join(backed_off))
    paused = [f"{s} {r['thermal_paused_s']:.0f} s" for s, r in report["styles"].items() if r["thermal_paused_s"]]
    if paused:
        console.print("paused while the machine was throttling: " + ", ".join(paused))
    console.print(f"adapters: {args.out}  metrics: {args.metrics}  loss curves: {args.plots}")


if __name__ == "__main__":
    main()
