"""Documentation phase: the Hugging Face style model card of a release.

Renders `README.md` with YAML front matter (`base_model`, `library_name: diffusers`,
`license`, `tags`, `pipeline_tag`, `instance_prompt`, `model-index` metrics) and a body
describing the styles, the blends, the training settings and results, the validation
metrics and gate verdict, how to use the adapters with stock diffusers, and limitations.

The inputs are the stage reports (`reports/train.json`, `validation.json`, `gate.json`,
`registry.json`, and optionally `environment.json`/`research.json`, `export.json` (the
"Deployment exports" section: every exported artifact with size, bit width and fidelity) and
`quantize.json` (the "Quantization ladder" section, omitted when absent)). They are read
defensively: a missing report or key is noted in the card ("not available") instead of
failing the docs stage, because a card with a gap is more useful than no card.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from stunning.config import Params

log = logging.getLogger(__name__)

TAGS = ["lora", "text-to-image", "stable-diffusion", "diffusers", "stunning-engine"]
REPORT_NAMES = ("train", "validation", "gate", "registry", "environment", "research", "export", "quantize")
NA = "not available"


def load_reports(reports_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Read the known report JSONs from `reports_dir`; a missing or unreadable one is `{}`."""
    reports_dir = Path(reports_dir)
    out: dict[str, dict[str, Any]] = {}
    for name in REPORT_NAMES:
        path = reports_dir / f"{name}.json"
        if not path.is_file():
            log.warning("model card: %s not found; its section will say '%s'", path, NA)
            out[name] = {}
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("model card: cannot read %s (%s); its section will say '%s'", path, exc, NA)
            data = {}
        out[name] = data if isinstance(data, dict) else {}
    return out


def base_model_id(params: Params) -> str:
    """A readable id of the base model: a Hub id when the path is a Hugging Face cache
    snapshot (`models--org--name/snapshots/<rev>`), else the embedded model's name or the path."""
    if params.base.source == "embedded":
        return "stunning-engine/embedded-micro"
    for part in Path(params.base.path).parts:
        m = re.fullmatch(r"models--([^/]+?)--(.+)", part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    return params.base.path


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return NA
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v, digits) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as `a.b.c` keys (booleans and text skipped)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}."))
        elif (num := _num(value)) is not None:
            flat[name] = num
    return flat


def _variants(validation: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    variants = validation.get("variants")
    if not isinstance(variants, Mapping):
        return {}
    return {str(k): flatten_metrics(v) for k, v in variants.items() if isinstance(v, Mapping)}


def front_matter(params: Params, reports: Mapping[str, Mapping[str, Any]], license: str, grid_name: str | None) -> dict:
    """The YAML metadata block Hugging Face reads (model-index holds the validation metrics)."""
    registry = reports.get("registry", {})
    gate = reports.get("gate", {})
    model_name = registry.get("model_name") or params.registry.model_name
    metrics = []
    for variant, flat in _variants(reports.get("validation", {})).items():
        for key, value in flat.items():
            metrics.append({"type": key, "name": f"{variant} {key}", "value": value})
    meta: dict[str, Any] = {
        "base_model": base_model_id(params),
        "library_name": "diffusers",
        "license": license,
        "tags": list(TAGS) + [f"style:{s}" for s in params.data.styles],
        "pipeline_tag": "text-to-image",
        "instance_prompt": params.train.sample_prompt,
        "styles": list(params.data.styles),
        "blends": {b.name: dict(b.weights) for b in params.merge.blends},
        "gate_passed": gate.get("passed") if isinstance(gate.get("passed"), bool) else None,
        "model-index": [
            {
                "name": model_name,
                "results": [
                    {
                        "task": {"type": "text-to-image", "name": "Text-to-Image"},
                        "dataset": {
                            "type": "local",
                            "name": f"curated validation split ({', '.join(params.data.styles)})",
                        },
                        "metrics": metrics,
                    }
                ],
            }
        ],
    }
    if registry.get("version") is not None:
        meta["version"] = str(registry["version"])
    if grid_name:
        meta["widget"] = [
            {
                "text": params.validate_.prompts[0] if params.validate_.prompts else params.train.sample_prompt,
                "output": {"url": grid_name},
            }
        ]
    return meta


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _training_section(params: Params, train: Mapping[str, Any], environment: Mapping[str, Any]) -> list[str]:
    t = params.train
    lines = ["## Training", ""]
    batch = str(t.batch_size)
    if t.batch_size == "auto" and isinstance(train.get("styles"), Mapping):
        styles = train["styles"].values()
        chosen = sorted({r["batch_size"] for r in styles if isinstance(r, Mapping) and r.get("batch_size")})
        if chosen:
            batch = f"auto ({', '.join(map(str, chosen))})"
    settings = [
        ["LoRA rank / alpha", f"{t.rank} / {t.alpha:g}"],
        ["target modules", ", ".join(t.target_modules)],
        ["learning rate", f"{t.learning_rate:g}"],
        ["steps", t.steps],
        ["batch size x gradient accumulation", f"{batch} x {t.gradient_accumulation}"],
        ["mixed precision", t.mixed_precision],
        ["resolution", f"{params.data.resolution} px"],
        ["seed", t.seed],
    ]
    if environment:
        libs = environment.get("libraries", {}) if isinstance(environment.get("libraries"), Mapping) else {}
        settings.append(["device", environment.get("device", NA)])
        settings.append(
            ["torch / diffusers / peft", " / ".join(str(libs.get(k, NA)) for k in ("torch", "diffusers", "peft"))]
        )
    lines += _table(["setting", "value"], settings)
    styles = train.get("styles") if isinstance(train.get("styles"), Mapping) else {}
    lines += ["", "Results per style:", ""]
    if styles:
        rows = []
        for style in params.data.styles:
            s = styles.get(style, {}) if isinstance(styles.get(style), Mapping) else {}
            rows.append(
                [
                    style,
                    s.get("final_loss"),
                    s.get("steps"),
                    s.get("steps_per_s"),
                    s.get("peak_memory_mb"),
                    s.get("mlflow_run_id"),
                ]
            )
        lines += _table(["style", "final loss", "steps", "steps/s", "peak memory MB", "MLflow run"], rows)
    else:
        lines.append(f"Training report {NA}.")
    return lines + [""]


def _validation_section(
    params: Params,
    validation: Mapping[str, Any],
    gate: Mapping[str, Any],
    registry: Mapping[str, Any],
    grid_name: str | None,
) -> list[str]:
    v = params.validate_
    lines = [
        "## Validation",
        "",
        f"Fixed prompts ({len(v.prompts)}) x seeds {list(v.seeds)}, {v.steps} steps, guidance scale {v.guidance_scale:g}.",
        "",
    ]
    if grid_name:
        lines += [f"![validation grid]({grid_name})", ""]
    variants = _variants(validation)
    if variants:
        keys = sorted({k for flat in variants.values() for k in flat})
        lines += _table(["variant", *keys], [[name, *(flat.get(k) for k in keys)] for name, flat in variants.items()])
    else:
        lines.append(f"Validation metrics {NA}.")
    lines += ["", "### Promotion gate", ""]
    passed = gate.get("passed")
    if isinstance(passed, bool):
        lines.append(f"Verdict: **{'PASSED' if passed else 'FAILED'}**.")
        checks = [c for c in gate.get("checks", []) if isinstance(c, Mapping)]
        if checks:
            lines += [""] + _table(
                ["check", "value", "threshold", "verdict", "detail"],
                [[c.get("name"), c.get("value"), c.get("threshold"), c.get("verdict", c.get("passed")), c.get("detail")]
                 for c in checks],
            )
        reasons = [r for r in gate.get("reasons", []) if r]
        if reasons:
            lines += ["", "Reasons it was not promoted:", ""] + [f"- {_fmt(r)}" for r in reasons]
    else:
        lines.append(f"Gate verdict {NA}.")
    if registry:
        lines += [
            "",
            f"Registry: `{registry.get('model_name', params.registry.model_name)}` version "
            f"{_fmt(registry.get('version'))}; promoted to `@champion`: {_fmt(registry.get('promoted'))}; "
            f"champion version {_fmt(registry.get('champion_version'))} "
            f"(previous {_fmt(registry.get('previous_champion_version'))}).",
        ]
    return lines + [""]


def _extra_call_args(params: Params) -> str:
    """Call arguments the base model needs beyond the stock defaults (the micro model has no T5)."""
    if params.base.source == "embedded":
        from stunning.embedded import T5_TOKENS

        return f", max_sequence_length={T5_TOKENS}"
    return ""


def _usage_section(params: Params) -> list[str]:
    styles = list(params.data.styles)
    prompt = params.train.sample_prompt
    v = params.validate_
    code = [
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{params.base.path}", torch_dtype=torch.float32)',
        f'pipe.load_lora_weights("adapters/{styles[0]}", adapter_name="{styles[0]}")',
        f'image = pipe("{prompt}", num_inference_steps={v.steps}, guidance_scale={v.guidance_scale:g}{_extra_call_args(params)}).images[0]',
        'image.save("out.png")',
        "```",
    ]
    lines = [
        "## How to use",
        "",
        "The adapters are plain diffusers LoRA files: no Stunning Engine code is needed. "
        "`example.py` in the release does the same from the command line.",
        "",
        *code,
        "",
    ]
    if len(styles) > 1 or params.merge.blends:
        blend = params.merge.blends[0] if params.merge.blends else None
        names = list(blend.weights) if blend else styles[:2]
        weights = [blend.weights[n] for n in names] if blend else [0.5] * len(names)
        lines += [
            "Blend styles at load time with PEFT adapters:",
            "",
            "```python",
            *[f'pipe.load_lora_weights("adapters/{n}", adapter_name="{n}")' for n in names],
            f"pipe.set_adapters({names!r}, adapter_weights={weights!r})",
            "```",
            "",
        ]
        if blend:
            lines += [
                f'or load the pre-computed blend: `pipe.load_lora_weights("blends/{blend.name}")`.',
                "",
            ]
    return lines


def _mb(n: Any) -> str:
    return f"{n / 1e6:.2f} MB" if _num(n) is not None else NA


def _fidelity(a: Mapping[str, Any]) -> str:
    f = a.get("fidelity") if isinstance(a.get("fidelity"), Mapping) else {}
    if a.get("format") == "coreml":
        return (f"weights vs torch: rel. RMS error {_fmt(f.get('weight_rel_rms_error_mean'), 3)} mean, "
                f"{_fmt(f.get('weight_rel_rms_error_max'), 3)} max; exported graph max abs error "
                f"{_fmt(f.get('graph_max_abs_error'), 3)}")
    if a.get("format") == "onnx":
        psnr = f.get("psnr_db_min")
        images = "identical images" if psnr is None else f"min image PSNR {_fmt(psnr, 4)} dB"
        return f"max abs error {_fmt(f.get('max_abs_error'), 3)} vs torch (ONNX Runtime); {images}"
    if a.get("format") == "swift-package":
        return (f"not compiled here; its sampler rule matches diffusers to {_fmt(f.get('sampler_max_abs_error'), 3)} "
                "(latents)")
    return ", ".join(f"{k} {_fmt(v, 3)}" for k, v in f.items()) or NA


def _exports_section(export: Mapping[str, Any]) -> list[str]:
    """Every exported artifact with size, bit width and fidelity (reports/export.json)."""
    lines = ["## Deployment exports", ""]
    rows = [a for a in export.get("artifacts", []) if isinstance(a, Mapping)] if export else []
    if not rows:
        return lines + [f"Export report {NA} (run the `export` stage).", ""]
    lines += [
        f"The fused model ({_fmt(export.get('family'))}, {_fmt(export.get('resolution'))} px, "
        f"{_fmt(export.get('batch'))} image(s) per call, fixed shapes) is exported under `export/` in the release:",
        "",
    ]
    lines += _table(["artifact", "part", "format", "bits", "size", "fidelity"],
                    [[f"`export/{a.get('path')}`", a.get("component"), a.get("format"),
                      a.get("bits") if a.get("bits") is not None else "-", _mb(a.get("bytes")), _fidelity(a)]
                     for a in rows])
    swift = export.get("swift") if isinstance(export.get("swift"), Mapping) else {}
    lines += [
        "",
        "**What could not be checked here.** Core ML predicts only on Apple platforms: the packages were "
        "converted and palettized on Linux, their input/output names, shapes and types and every palettized "
        "weight were checked against the torch model, but no package was run (tests comparing Core ML images "
        "with torch run on macOS and are skipped elsewhere). The Swift app template (`export/swift`) cannot "
        "be compiled here (no Swift toolchain): "
        + (str(swift.get("reason")) if swift.get("reason") else "build it with `swift build` on a Mac (its README).")
        ,
    ]
    not_covered = export.get("not_covered") if isinstance(export.get("not_covered"), Mapping) else {}
    if not_covered.get("flux"):
        lines += ["", f"FLUX: {not_covered['flux']}"]
    if export.get("failures"):
        lines += ["", "**Export budget failures:** " + "; ".join(_fmt(f) for f in export["failures"])]
    return lines + [""]


def _quantization_section(quantize: Mapping[str, Any]) -> list[str]:
    """The quantization ladder of reports/quantize.json; no section at all when it is absent."""
    levels = [lv for lv in quantize.get("levels", []) if isinstance(lv, Mapping)] if quantize else []
    if not levels:
        return []
    lines = ["## Quantization ladder", ""]
    target = quantize.get("target") if isinstance(quantize.get("target"), Mapping) else {}
    budgets = quantize.get("budgets") if isinstance(quantize.get("budgets"), Mapping) else {}
    if target or budgets:
        lines += [f"Target {_fmt(target.get('name'))} (memory budget {_fmt(target.get('memory_budget_mb'))} MB); "
                  f"budgets: PSNR >= {_fmt(budgets.get('min_psnr'))} dB, style gain loss <= "
                  f"{_fmt(budgets.get('max_style_gain_loss'))}.", ""]
    rows = []
    for lv in levels:
        variants = [v for v in (lv.get("variants") or {}).values() if isinstance(v, Mapping)]
        psnrs = [p for v in variants if (p := _num(v.get("psnr"))) is not None]
        peaks = [p for v in variants if (p := _num(v.get("peak_memory_mb"))) is not None]
        if not lv.get("runs", True):
            verdict = f"cannot run here: {_fmt(lv.get('reason'))}"
        else:
            verdict = "passes" if lv.get("passes") else "fails: " + "; ".join(_fmt(f) for f in lv.get("failures") or [])
        rows.append([lv.get("level"), lv.get("backend"), _mb(lv.get("denoiser_bytes")), lv.get("size_ratio"),
                     min(psnrs) if psnrs else None, max(peaks) if peaks else None, verdict])
    lines += _table(["level", "backend", "denoiser size", "size ratio", "min PSNR dB", "peak memory MB", "verdict"], rows)
    chosen = quantize.get("chosen")
    lines += ["", f"Chosen: **{_fmt(chosen) if chosen else 'none'}**." + (f" {_fmt(quantize.get('why'))}"
                                                                         if quantize.get("why") else "")]
    return lines + [""]


def render_model_card(
    params: Params,
    reports: Mapping[str, Mapping[str, Any]],
    grid_name: str | None = "grid.png",
    license: str = "other",
) -> str:
    """The model card text (front matter + Markdown body) from params and stage reports."""
    meta = front_matter(params, reports, license, grid_name)
    title = reports.get("registry", {}).get("model_name") or params.registry.model_name
    styles = list(params.data.styles)
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {title}: LoRA style adapters",
        "",
        f"LoRA adapters that give `{base_model_id(params)}` the style of a folder of photos, one adapter per "
        f"style ({', '.join(f'`{s}`' for s in styles)}), plus weighted blends of them. They were trained, "
        "validated against fixed prompts and seeds, and checked against memory, latency and quality "
        "budgets by the Stunning Engine pipeline.",
        "",
        "## Styles",
        "",
        *[f"- `{s}`: adapter in `adapters/{s}/pytorch_lora_weights.safetensors`" for s in styles],
        "",
        "## Blends",
        "",
    ]
    if params.merge.blends:
        lines += _table(
            ["blend", "weights", "file"],
            [
                [
                    b.name,
                    ", ".join(f"{k} {w:g}" for k, w in b.weights.items()),
                    f"blends/{b.name}/pytorch_lora_weights.safetensors",
                ]
                for b in params.merge.blends
            ],
        )
        lines += ["", f"The `{params.merge.fuse}` adapter is also fused into a full pipeline (merge stage)."]
    else:
        lines.append("No blends were configured.")
    lines.append("")
    lines += _training_section(params, reports.get("train", {}), reports.get("environment", {}))
    lines += _validation_section(
        params, reports.get("validation", {}), reports.get("gate", {}), reports.get("registry", {}), grid_name
    )
    lines += _quantization_section(reports.get("quantize", {}))
    lines += _exports_section(reports.get("export", {}))
    lines += _usage_section(params)
    lines += [
        "## Limitations",
        "",
        f"- Trained on {params.data.resolution} px images; other resolutions may lose the style or add artefacts.",
        "- A style adapter learns what its photos share, including unwanted regularities "
        "(framing, colour casts, subjects); review the validation grid before use.",
        "- Metrics are measured on a small fixed prompt set; they detect regressions, they do not prove quality.",
        "- The base model's own license, biases and limitations apply to every output.",
    ]
    if params.base.source == "embedded":
        lines.append(
            "- The base model is the project's 4 M-parameter micro model (SD3 layout, 32 px), trained "
            "from scratch on a procedural world of garments on plain backgrounds: it follows prompts of "
            "that world and shows that the adapters work, it does not make photographs. Train on a "
            "real base model (`base.source: local`) for real use."
        )
    gate = reports.get("gate", {})
    if gate.get("passed") is False:
        lines.append("- **This release did not pass the promotion gate** (see Reasons above).")
    return "\n".join(lines) + "\n"


def build_model_card(
    params: Params,
    reports_dir: str | Path,
    grid: str | Path | None,
    out_dir: str | Path,
    license: str = "other",
) -> dict[str, Any]:
    """Write `out_dir/README.md` (and copy the validation grid as `grid.png`), atomically."""
    from stunning.io import atomic_dir

    reports = load_reports(reports_dir)
    grid_path = Path(grid) if grid else None
    grid_name = None
    if grid_path is not None:
        if grid_path.is_file():
            grid_name = "grid" + (grid_path.suffix or ".png")
        else:
            log.warning("model card: grid image %s not found; the card will have no image", grid_path)
    text = render_model_card(params, reports, grid_name=grid_name, license=license)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "README.md").write_text(text, encoding="utf-8")
        if grid_name and grid_path is not None:
            shutil.copyfile(grid_path, tmp / grid_name)
    missing = [name for name in ("train", "validation", "gate", "registry") if not reports.get(name)]
    return {
        "readme": str(out_dir / "README.md"),
        "grid": str(out_dir / grid_name) if grid_name else None,
        "missing_reports": missing,
        "gate_passed": reports.get("gate", {}).get("passed"),
    }


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(metadata, body) of a card; raises ValueError if there is no front matter block."""
    if not text.startswith("---\n"):
        raise ValueError("model card has no YAML front matter (must start with '---')")
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ValueError("model card front matter is not closed with '---'")
    meta = yaml.safe_load(text[4:end]) or {}
    return meta, text[end + 5 :]
