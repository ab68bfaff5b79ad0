"""The promotion gate: a candidate is promoted only if it meets every budget.

:func:`evaluate` turns the validation metrics (``reports/validation.json``), the merge
report (``reports/merge.json``) and the budgets (``params.budgets``) into a
:class:`GateReport`: one :class:`Check` per rule with its value, threshold and verdict,
``passed`` when all pass, and ``reasons`` naming each failure in words a reviewer can act
on. With the registry's current champion metrics it also refuses a candidate whose style
gain is worse than the champion's by more than ``max_regression_vs_champion``.

The report is data, not an exception: the validate stage always writes it, and the
register stage moves the ``@champion`` alias only when ``passed`` is true. The flat
``candidate.metrics`` (``style_gain/<style>``, ``latency_s``, …) are what the registry
tags on the version, so the next run's champion comparison reads the same keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from stunning.config import BudgetsConfig


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    threshold: float | None
    passed: bool
    detail: str


@dataclass
class GateReport:
    passed: bool
    checks: list[Check]
    reasons: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] | None = None
    candidate_info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``reports/gate.json`` format of docs/pipeline.md.

        ``candidate`` holds the flat ``metrics`` (what the registry tags on the version and
        returns as champion metrics later) plus any descriptive ``candidate_info``;
        ``champion`` is the champion's metrics the candidate was compared with.
        """
        return {
            "passed": self.passed,
            "checks": [asdict(c) for c in self.checks],
            "reasons": list(self.reasons),
            "candidate": {**self.candidate_info, "metrics": dict(self.metrics)},
            "champion": None if self.champion is None else dict(self.champion),
        }

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no gate check named {name!r}; checks: {[c.name for c in self.checks]}")


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _at_least(name: str, value: Any, threshold: float, budget: str, detail: str) -> Check:
    ok = _finite(value) and value >= threshold
    return Check(name, _num(value), float(threshold), ok, f"must be >= {threshold:g} ({budget}); {detail}")


def _at_most(name: str, value: Any, threshold: float, budget: str, detail: str) -> Check:
    ok = _finite(value) and value <= threshold
    return Check(name, _num(value), float(threshold), ok, f"must be <= {threshold:g} ({budget}); {detail}")


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _as_dict(validation: Any) -> Mapping[str, Any]:
    return validation.to_dict() if hasattr(validation, "to_dict") else validation


def candidate_metrics(validation: Any, merge_report: Mapping[str, Any] | None) -> dict[str, float]:
    """Flat metrics of a candidate: what the gate checks and the registry stores."""
    v = _as_dict(validation)
    variants: Mapping[str, Mapping[str, Any]] = v.get("variants", {})
    out: dict[str, float] = {}
    for style, g in sorted(v.get("style_gain", {}).items()):
        out[f"style_gain/{style}"] = float(g)
    for style, m in sorted(v.get("style_margin", {}).items()):
        out[f"style_margin/{style}"] = float(m)
    for style, d in sorted(v.get("adherence_drop", {}).items()):
        out[f"adherence_drop/{style}"] = float(d)
    base_adherence = variants.get("base", {}).get("adherence", {}) if variants else {}
    for attribute, acc in sorted(base_adherence.items()):
        out[f"base_adherence/{attribute}"] = float(acc)
    if variants:
        out["peak_memory_mb"] = max(float(x.get("peak_memory_mb", math.nan)) for x in variants.values())
        out["latency_s"] = max(float(x.get("latency_s", math.nan)) for x in variants.values())
        out["blank_images"] = float(sum(int(x.get("blank_images", 0)) for x in variants.values()))
    if merge_report:
        for key, name in (("size_ratio", "quantized_size_ratio"), ("quantization_mse", "quantization_mse")):
            if key in merge_report:
                out[name] = float(merge_report[key])
    return out


def _worst(variants: Mapping[str, Mapping[str, Any]], key: str) -> tuple[float, str]:
    name = max(variants, key=lambda n: float(variants[n].get(key, math.inf)))
    return float(variants[name].get(key, math.nan)), name


def evaluate(
    validation: Any,
    merge_report: Mapping[str, Any] | None,
    budgets: BudgetsConfig,
    champion: Mapping[str, float] | None = None,
    candidate_info: Mapping[str, Any] | None = None,
) -> GateReport:
    """Check a candidate against the budgets (and the champion, if any); see the module doc."""
    v = _as_dict(validation)
    variants: Mapping[str, Mapping[str, Any]] = v.get("variants", {})
    gains: Mapping[str, float] = v.get("style_gain", {})
    adapters: Mapping[str, Mapping[str, Any]] = v.get("adapters", {})
    checks: list[Check] = []

    # 1. Each adapter must move the base towards its own style.
    if not gains:
        checks.append(Check("style_gain", None, budgets.min_style_gain, False, "no adapter was validated"))
    for style, gain in sorted(gains.items()):
        info = adapters.get(style, {})
        detail = (
            f"adapter {style!r}: content-matched distance to {style} references {info['own_distance']:.4g} vs base "
            f"{info['base_distance']:.4g}"
            if "own_distance" in info and "base_distance" in info
            else f"adapter {style!r}"
        )
        checks.append(_at_least(f"style_gain/{style}", gain, budgets.min_style_gain, "budgets.min_style_gain", detail))

    # 1b. ... without losing the prompt (oracle adherence on the attributes the style keeps).
    readable: Mapping[str, list[str]] = v.get("readable_attributes", {})
    drops: Mapping[str, float] = v.get("adherence_drop", {})
    if not readable:
        checks.append(Check("adherence_drop", None, budgets.max_adherence_drop, True,
                            "not measurable: the validation prompts are not in the embedded world's grammar"))
    for style in sorted(gains):
        if style not in readable:
            continue
        if style not in drops:
            checks.append(Check(f"adherence_drop/{style}", None, budgets.max_adherence_drop, True,
                                f"the oracle cannot read any attribute in {style!r} images; nothing to compare"))
            continue
        checks.append(_at_most(
            f"adherence_drop/{style}", drops[style], budgets.max_adherence_drop, "budgets.max_adherence_drop",
            f"base minus adapter adherence on {', '.join(readable[style])}",
        ))

    # 2. Resource budgets: the worst variant counts (any of them may be served).
    if variants:
        mem, mem_at = _worst(variants, "peak_memory_mb")
        checks.append(
            _at_most("peak_memory_mb", mem, budgets.max_peak_memory_mb, "budgets.max_peak_memory_mb", f"worst variant: {mem_at}")
        )
        lat, lat_at = _worst(variants, "latency_s")
        checks.append(
            _at_most("latency_s", lat, budgets.max_latency_s, "budgets.max_latency_s", f"mean seconds per image; worst variant: {lat_at}")
        )
        blanks = {n: int(x.get("blank_images", 0)) for n, x in variants.items()}
        bad = {n: k for n, k in blanks.items() if k}
        checks.append(
            Check(
                "valid_images",
                float(sum(blanks.values())),
                0.0,
                not bad,
                "images with NaN or no content (pixel std ~ 0) must be 0; "
                + (f"blank in {bad}" if bad else f"all {sum(int(x.get('images', 0)) for x in variants.values())} images have content"),
            )
        )
    else:
        checks.append(Check("variants", None, None, False, "the validation generated no images"))

    # 3. Quantization budgets, from the merge report.
    if merge_report is None:
        for name, thr in (("quantized_size_ratio", budgets.max_quantized_size_ratio),
                          ("quantization_mse", budgets.max_quantization_mse)):
            checks.append(Check(name, None, thr, False, "no merge report (reports/merge.json): run the merge stage"))
    else:
        checks.append(
            _at_most(
                "quantized_size_ratio", merge_report.get("size_ratio"), budgets.max_quantized_size_ratio,
                "budgets.max_quantized_size_ratio",
                f"int8 {merge_report.get('int8_denoiser_bytes', '?')} B / fp32 {merge_report.get('fp32_denoiser_bytes', '?')} B",
            )
        )
        checks.append(
            _at_most(
                "quantization_mse", merge_report.get("quantization_mse"), budgets.max_quantization_mse,
                "budgets.max_quantization_mse",
                f"pixel MSE int8 vs fp32 (max abs diff {merge_report.get('quantization_max_abs', float('nan')):.4g})",
            )
        )

    # 4. No regression against the current champion.
    if champion is None:
        checks.append(Check("vs_champion", None, None, True, "no champion registered yet: nothing to regress against"))
    else:
        r = budgets.max_regression_vs_champion
        for style, gain in sorted(gains.items()):
            key = f"style_gain/{style}"
            champ = champion.get(key)
            if not _finite(champ):
                checks.append(Check(f"vs_champion/{key}", _num(gain), None, True, "the champion has no value for this style"))
                continue
            threshold = champ - r * abs(champ)
            checks.append(
                _at_least(
                    f"vs_champion/{key}", gain, threshold, "budgets.max_regression_vs_champion",
                    f"champion {champ:.4g}, at most {r:.0%} worse allowed",
                )
            )

    reasons = [_reason(c) for c in checks if not c.passed]
    return GateReport(
        passed=not reasons,
        checks=checks,
        reasons=reasons,
        metrics=candidate_metrics(v, merge_report),
        champion=None if champion is None else {k: float(x) for k, x in champion.items() if _finite(x)},
        candidate_info=dict(candidate_info or {}),
    )


def _reason(c: Check) -> str:
    value = "missing" if c.value is None else f"{c.value:.4g}"
    return f"{c.name} = {value}: {c.detail}"
