"""The promotion gate: a candidate is promoted only if it meets every budget and does not
regress against the champion beyond measurement noise.

:func:`evaluate` turns the validation metrics (``reports/validation.json``), the merge
report (``reports/merge.json``) and the budgets (``params.budgets``) into a
:class:`GateReport`: one :class:`Check` per rule with its value, threshold and verdict
(``pass``, ``fail`` or ``not_measured``), ``passed`` when nothing blocks, ``reasons`` naming
each blocking check in words a reviewer can act on, and ``not_evaluated`` listing every
check that could not be evaluated and why.

Every gate metric is one row of :data:`METRICS`: its name, its direction (higher or lower is
better), the ``budgets`` field holding its absolute budget (if any) and how it is read off
the reports. Each measured metric is checked twice: against its absolute budget (check
``<key>``, e.g. ``style_gain/noir`` or ``latency_s``) and against the ``@champion``'s value
(check ``vs_champion/<key>``). A metric that could not be measured is ``not_measured``, never
a pass: it blocks promotion when ``budgets.required`` names it and is listed (without
blocking) otherwise. A measured value that is NaN fails.

**Why the champion comparison cannot ratchet down.** The candidate may be worse than the
champion only by the metric's measurement noise, the *band*: ``budgets.noise_sigmas`` x the
per-seed spread the validation reports for that metric (``validation["spread"]`` or
``<metric>_std``; candidate and champion spreads combined in quadrature), never less than
the floors ``budgets.noise_floor[metric]`` (absolute) and
``budgets.noise_floor_relative[metric]`` (x the reference). The band is noise, not a
per-promotion allowance, and it is measured from the champion's *reference* value, which
the gate report carries forward as ``reference/<key>`` in the candidate's metrics (the
registry tags it on the version like every metric, so the next run's champion has it): a
promoted candidate that is worse than the reference, or better by less than one band, is
indistinguishable from it and keeps the old reference; only a candidate better by more than
one band sets a new one. References therefore never get worse, and every promoted candidate
is within one band of every earlier reference: a chain of promotions, each slightly worse,
stops one band below the first champion instead of drifting (the removed
``max_regression_vs_champion`` allowed 10 % per promotion, compounding). A champion
registered before references existed is its own reference.

The report is data, not an exception: the validate stage always writes it, and the
register stage moves the ``@champion`` alias only when ``passed`` is true. The flat
``candidate.metrics`` (``style_gain/<style>``, ``latency_s``, ``reference/…``,
``spread/…``) are what the registry tags on the version, so the next run's champion
comparison reads the same keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from stunning.config import BudgetsConfig, ConfigError

Verdict = Literal["pass", "fail", "not_measured"]
VERDICTS: tuple[str, ...] = ("pass", "fail", "not_measured")
HIGHER, LOWER = True, False


@dataclass(frozen=True)
class Check:
    """One rule's outcome. ``verdict`` is ``pass``, ``fail`` or ``not_measured``; ``passed``
    (kept for readers of older reports) is true for ``pass`` and for an optional
    ``not_measured`` check, i.e. it says whether this check lets the candidate through."""

    name: str
    value: float | None
    threshold: float | None
    passed: bool
    detail: str
    verdict: Verdict | None = None  # None: derived from `passed`

    def __post_init__(self) -> None:
        if self.verdict is None:
            object.__setattr__(self, "verdict", "pass" if self.passed else "fail")
        if self.verdict not in VERDICTS:
            raise ValueError(f"check {self.name!r}: verdict {self.verdict!r} is not one of {VERDICTS}")
        if self.verdict == "fail" and self.passed:
            raise ValueError(f"check {self.name!r}: a failed check cannot pass")


@dataclass
class GateReport:
    passed: bool
    checks: list[Check]
    reasons: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] | None = None
    candidate_info: dict[str, Any] = field(default_factory=dict)
    not_evaluated: list[dict[str, Any]] = field(default_factory=list)
    required: list[str] = field(default_factory=list)
    quantization: dict[str, Any] | None = None  # the ladder's choice and why (reports/quantize.json)

    def to_dict(self) -> dict[str, Any]:
        """The ``reports/gate.json`` format of docs/pipeline.md.

        ``candidate`` holds the flat ``metrics`` (what the registry tags on the version and
        returns as champion metrics later) plus any descriptive ``candidate_info``;
        ``champion`` is the champion's metrics the candidate was compared with;
        ``not_evaluated`` lists each ``not_measured`` check (``name``, ``reason``,
        ``required``: whether it blocked).
        """
        return {
            "passed": self.passed,
            "checks": [asdict(c) for c in self.checks],
            "reasons": list(self.reasons),
            "not_evaluated": [dict(x) for x in self.not_evaluated],
            "required": list(self.required),
            "candidate": {**self.candidate_info, "metrics": dict(self.metrics)},
            "champion": None if self.champion is None else dict(self.champion),
            "quantization": None if self.quantization is None else dict(self.quantization),
        }

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no gate check named {name!r}; checks: {[c.name for c in self.checks]}")


# --------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class Measurement:
    """One value of a gate metric: ``key`` is the flat metric key (``style_gain/noir``,
    ``latency_s``); ``value`` None means not measured, ``reason`` says why."""

    key: str
    value: float | None
    detail: str = ""
    reason: str = ""
    std: float | None = None  # the value's per-seed spread, where the report gives one


Measure = Callable[[Mapping[str, Any], "Mapping[str, Any] | None"], list[Measurement]]


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _std(x: Any) -> float | None:
    return float(x) if _finite(x) and x >= 0 else None


def _as_dict(validation: Any) -> Mapping[str, Any]:
    return validation.to_dict() if hasattr(validation, "to_dict") else validation


def _style_gain(v: Mapping[str, Any], merge: Mapping[str, Any] | None) -> list[Measurement]:
    gains: Mapping[str, Any] = v.get("style_gain", {})
    adapters: Mapping[str, Mapping[str, Any]] = v.get("adapters", {})
    if not gains:
        return [Measurement("style_gain", None, reason="no adapter was validated")]
    out = []
    for style, gain in sorted(gains.items()):
        info = adapters.get(style, {})
        detail = (
            f"adapter {style!r}: content-matched distance to {style} references {info['own_distance']:.4g} vs base "
            f"{info['base_distance']:.4g}"
            if "own_distance" in info and "base_distance" in info
            else f"adapter {style!r}"
        )
        out.append(Measurement(f"style_gain/{style}", _num(gain) if _num(gain) is not None else math.nan, detail))
    return out


def _eval_loss(v: Mapping[str, Any], merge: Mapping[str, Any] | None) -> list[Measurement]:
    losses = v.get("eval_loss")
    if not isinstance(losses, Mapping) or not losses:
        return [Measurement("eval_loss", None, reason="the validation report has no eval_loss (fixed-noise validation loss per adapter)")]
    out = []
    for style in sorted(set(losses) | set(v.get("style_gain", {}))):
        entry = losses.get(style)
        if not isinstance(entry, Mapping) or entry.get("measured") is False or _num(entry.get("adapter")) is None:
            why = entry.get("reason") if isinstance(entry, Mapping) and entry.get("reason") else "not reported"
            out.append(Measurement(f"eval_loss/{style}", None, reason=f"no eval_loss for adapter {style!r}: {why}"))
            continue
        base = _num(entry.get("base"))
        detail = f"adapter {style!r} validation loss" + (f" (base {base:.4g})" if base is not None else "")
        out.append(Measurement(f"eval_loss/{style}", float(entry["adapter"]), detail, std=_std(entry.get("adapter_std"))))
    return out


def _adherence_drop(v: Mapping[str, Any], merge: Mapping[str, Any] | None) -> list[Measurement]:
    readable: Mapping[str, list[str]] = v.get("readable_attributes", {})
    drops: Mapping[str, Any] = v.get("adherence_drop", {})
    if not readable:
        return [Measurement("adherence_drop", None,
                            reason="not measurable: the validation prompts are not in the embedded world's grammar")]
    out = []
    for style in sorted(v.get("style_gain", {})):
        if style not in readable:
            out.append(Measurement(f"adherence_drop/{style}", None, reason=f"no readable attributes reported for {style!r}"))
        elif style not in drops:
            out.append(Measurement(f"adherence_drop/{style}", None,
                                   reason=f"the oracle cannot read any attribute in {style!r} images; nothing to compare"))
        else:
            value = _num(drops[style])
            out.append(Measurement(f"adherence_drop/{style}", math.nan if value is None else value,
                                   f"base minus adapter adherence on {', '.join(readable[style])}"))
    return out


def _clip(key: str, what: str) -> Measure:
    """A per-style CLIP score from ``validation["clip"]`` (optional: ``validate.clip_model``)."""

    def measure(v: Mapping[str, Any], merge: Mapping[str, Any] | None) -> list[Measurement]:
        clip = v.get("clip")
        name = f"clip_{key}"
        if not isinstance(clip, Mapping) or not clip.get("measured"):
            why = clip.get("reason") if isinstance(clip, Mapping) and clip.get("reason") else "no CLIP scores reported"
            return [Measurement(name, None, reason=f"not measured: {why}")]
        out = []
        for style in sorted(v.get("style_gain", {})):
            entry = clip.get("styles", {}).get(style)
            if not isinstance(entry, Mapping):
                out.append(Measurement(f"{name}/{style}", None, reason=f"no CLIP scores for adapter {style!r}"))
                continue
            value = _num(entry.get(key))
            out.append(Measurement(f"{name}/{style}", math.nan if value is None else value, f"{what} ({clip.get('model')})"))
        return out

    return measure


def _worst_variant(key: str, what: str) -> Measure:
    """The worst variant counts (any of them may be served)."""

    def measure(v: Mapping[str, Any], merge: Mapping[str, Any] | None) -> list[Measurement]:
        variants: Mapping[str, Mapping[str, Any]] = v.get("variants", {})
        if not variants:
            return [Measurement(key, None, reason="the validation generated no images")]
        if not any(key in x for x in variants.values()):
            return [Measurement(key, None, reason=f"no variant reports {key}")]
        name = max(variants, key=lambda n: float(variants[n].get(key, math.inf)))
        value = _num(variants[name].get(key))
        return [Measurement(key, math.nan if value is None else value, f"{what}: {name}",
                            std=_std(variants[name].get(f"{key}_std")))]

    return measure


def _from_merge(key: str, name: str, describe: Callable[[Mapping[str, Any]], str]) -> Measure:
    def measure(v: Mapping[str, Any], merge: Mapping[str, Any] | None) -> list[Measurement]:
        if merge is None:
            return [Measurement(name, None, reason="no merge report (reports/merge.json): run the merge stage")]
        value = merge.get(key)
        if value is None:
            return [Measurement(name, None, reason=f"the merge report has no {key}")]
        return [Measurement(name, math.nan if _num(value) is None else float(value), describe(merge))]

    return measure


def _level(m: Mapping[str, Any]) -> str:
    """The quantization level a merge report describes (reports before the ladder: int8)."""
    return str(m.get("quantization") or "int8")


def _size_detail(m: Mapping[str, Any]) -> str:
    size = m.get("quantized_denoiser_bytes", m.get("int8_denoiser_bytes", "?"))
    return f"{_level(m)} {size} B / fp32 {m.get('fp32_denoiser_bytes', '?')} B"


def _mse_detail(m: Mapping[str, Any]) -> str:
    return f"pixel MSE {_level(m)} vs fp32 (max abs diff {m.get('quantization_max_abs', float('nan')):.4g})"


# --------------------------------------------------------------------------- the metric table


@dataclass(frozen=True)
class Metric:
    """A gate metric. ``budget``: the ``BudgetsConfig`` field with its absolute bound (a
    minimum if higher is better, else a maximum; None: compared with the champion only).
    Its band against the champion comes from ``budgets.noise_floor[name]`` and
    ``budgets.noise_floor_relative[name]`` (and the reported spread); ``budgets.required``
    lists it by ``name``."""

    name: str
    higher_is_better: bool
    budget: str | None
    measure: Measure

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b


#: Every metric the gate checks. Adding one is one row (and its measure function).
METRICS: tuple[Metric, ...] = (
    Metric("style_gain", HIGHER, "min_style_gain", _style_gain),
    Metric("eval_loss", LOWER, None, _eval_loss),
    Metric("adherence_drop", LOWER, "max_adherence_drop", _adherence_drop),
    Metric("clip_style_gain", HIGHER, None, _clip("style_gain", "CLIP image-image similarity to the style's references, adapter minus base")),
    Metric("clip_adherence_drop", LOWER, None, _clip("adherence_drop", "CLIP text-image similarity, base minus adapter")),
    Metric("peak_memory_mb", LOWER, "max_peak_memory_mb", _worst_variant("peak_memory_mb", "worst variant")),
    Metric("latency_s", LOWER, "max_latency_s", _worst_variant("latency_s", "mean seconds per image; worst variant")),
    Metric("quantized_size_ratio", LOWER, "max_quantized_size_ratio", _from_merge("size_ratio", "quantized_size_ratio", _size_detail)),
    Metric("quantization_mse", LOWER, "max_quantization_mse", _from_merge("quantization_mse", "quantization_mse", _mse_detail)),
)
METRIC_NAMES: tuple[str, ...] = tuple(m.name for m in METRICS)


def check_budgets(budgets: BudgetsConfig) -> None:
    """Raise :class:`ConfigError` when ``budgets`` names a metric the gate does not know."""
    for key in ("required", "noise_floor", "noise_floor_relative"):
        unknown = sorted(set(getattr(budgets, key)) - set(METRIC_NAMES))
        if unknown:
            raise ConfigError(f"budgets.{key}: unknown gate metric(s) {unknown}; known: {list(METRIC_NAMES)}")


def _flat_numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    if _finite(obj):
        return {prefix: float(obj)} if prefix else {}
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            out.update(_flat_numbers(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def _spreads(v: Mapping[str, Any]) -> dict[str, float]:
    """Per-seed spread (standard deviation) by flat metric key, from ``validation["spread"]``
    (flat or nested by style) or ``validation["<metric>_std"]`` (a number or one per style)."""
    out = {k: x for k, x in _flat_numbers(v.get("spread") or {}).items() if x >= 0}
    for name in METRIC_NAMES:
        s = v.get(f"{name}_std")
        if isinstance(s, Mapping):
            for style, x in s.items():
                if _std(x) is not None:
                    out.setdefault(f"{name}/{style}", float(x))
        elif _std(s) is not None:
            out.setdefault(name, float(s))
    return out


def _measurements(v: Mapping[str, Any], merge_report: Mapping[str, Any] | None) -> list[tuple[Metric, Measurement]]:
    spreads = _spreads(v)
    out = []
    for metric in METRICS:
        for m in metric.measure(v, merge_report):
            if m.std is None and m.key in spreads:
                m = Measurement(m.key, m.value, m.detail, m.reason, spreads[m.key])
            out.append((metric, m))
    return out


def candidate_metrics(validation: Any, merge_report: Mapping[str, Any] | None) -> dict[str, float]:
    """Flat metrics of a candidate: what the gate checks and the registry stores (every
    measured gate metric, its ``spread/<key>`` where reported, and descriptive extras)."""
    v = _as_dict(validation)
    variants: Mapping[str, Mapping[str, Any]] = v.get("variants", {})
    out: dict[str, float] = {}
    for style, m in sorted(v.get("style_margin", {}).items()):
        out[f"style_margin/{style}"] = float(m)
    for style, d in sorted(v.get("adherence_drop", {}).items()):
        out[f"adherence_drop/{style}"] = float(d)
    base_adherence = variants.get("base", {}).get("adherence", {}) if variants else {}
    for attribute, acc in sorted(base_adherence.items()):
        out[f"base_adherence/{attribute}"] = float(acc)
    if variants:
        out["blank_images"] = float(sum(int(x.get("blank_images", 0)) for x in variants.values()))
    for _, m in _measurements(v, merge_report):
        if m.value is not None:
            out[m.key] = float(m.value)
            if m.std is not None:
                out[f"spread/{m.key}"] = m.std
    return out


# --------------------------------------------------------------------------- checks


def _budget_check(metric: Metric, m: Measurement, budgets: BudgetsConfig, required: bool) -> Check:
    threshold = None if metric.budget is None else float(getattr(budgets, metric.budget))
    if m.value is None:
        need = "required by budgets.required" if required else "optional: not in budgets.required"
        return Check(m.key, None, threshold, not required, f"not measured ({need}): {m.reason}", "not_measured")
    op = ">=" if metric.higher_is_better else "<="
    if threshold is None:
        ok = _finite(m.value)
        rule = "no absolute budget: compared with the champion only" + ("" if ok else "; not a finite number")
        return Check(m.key, m.value, None, ok, f"{rule}; {m.detail}")
    ok = _finite(m.value) and (m.value >= threshold if metric.higher_is_better else m.value <= threshold)
    return Check(m.key, m.value, threshold, ok, f"must be {op} {threshold:g} (budgets.{metric.budget}); {m.detail}")


def _band(metric: Metric, m: Measurement, reference: float, budgets: BudgetsConfig,
          champion: Mapping[str, float]) -> tuple[float, str]:
    """The measurement-noise band around the reference, and where it came from."""
    sigmas = [s for s in (m.std, _std(champion.get(f"spread/{m.key}"))) if s is not None]
    sigma = math.sqrt(sum(s * s for s in sigmas)) if sigmas else None
    k = budgets.noise_sigmas
    options = [
        (0.0 if sigma is None else k * sigma, f"{k:g} sigma of the per-seed spread (sigma {sigma or 0:.3g})"),
        (budgets.noise_floor.get(metric.name, 0.0), f"budgets.noise_floor.{metric.name}"),
        (budgets.noise_floor_relative.get(metric.name, 0.0) * abs(reference),
         f"budgets.noise_floor_relative.{metric.name} = {budgets.noise_floor_relative.get(metric.name, 0.0):g} x reference"),
    ]
    band, source = max(options, key=lambda o: o[0])
    return float(band), source if band > 0 else "no noise allowed (no spread reported, no floor set)"


def _champion_check(metric: Metric, m: Measurement, budgets: BudgetsConfig,
                    champion: Mapping[str, float]) -> tuple[Check, float]:
    """``vs_champion/<key>`` and the reference this candidate carries forward if promoted."""
    name, value = f"vs_champion/{m.key}", float(m.value)  # type: ignore[arg-type]
    reference = champion.get(f"reference/{m.key}", champion.get(m.key))
    if not _finite(reference):
        return Check(name, value, None, True,
                     "not measured (optional): the champion has no value for this metric (a new style, or a metric "
                     "added since); nothing to regress against", "not_measured"), value
    assert reference is not None
    band, source = _band(metric, m, reference, budgets, champion)
    threshold = reference - band if metric.higher_is_better else reference + band
    ok = value >= threshold if metric.higher_is_better else value <= threshold
    direction = "higher" if metric.higher_is_better else "lower"
    raw = champion.get(m.key)
    champ = f"champion {raw:.4g}, reference {reference:.4g}" if _finite(raw) and raw != reference else f"champion {reference:.4g}"
    detail = f"{champ} {'-' if metric.higher_is_better else '+'} noise band {band:.4g} ({source}); {direction} is better"
    # Carried forward: only a candidate better by more than the band moves the reference.
    new_reference = value if metric.better(value, reference) and abs(value - reference) > band else reference
    return Check(name, value, threshold, ok, detail), new_reference


def _valid_images(variants: Mapping[str, Mapping[str, Any]]) -> Check:
    blanks = {n: int(x.get("blank_images", 0)) for n, x in variants.items()}
    bad = {n: k for n, k in blanks.items() if k}
    return Check(
        "valid_images",
        float(sum(blanks.values())),
        0.0,
        not bad,
        "images with NaN or no content (pixel std ~ 0) must be 0; "
        + (f"blank in {bad}" if bad else f"all {sum(int(x.get('images', 0)) for x in variants.values())} images have content"),
    )


def evaluate(
    validation: Any,
    merge_report: Mapping[str, Any] | None,
    budgets: BudgetsConfig,
    champion: Mapping[str, float] | None = None,
    candidate_info: Mapping[str, Any] | None = None,
    quantize_report: Mapping[str, Any] | None = None,
) -> GateReport:
    """Check a candidate against the budgets (and the champion, if any); see the module doc.

    With `quantize_report` (``reports/quantize.json``) the report carries the quantization
    ladder's choice and why, and check ``quantization`` blocks when no level passed."""
    check_budgets(budgets)
    v = _as_dict(validation)
    variants: Mapping[str, Mapping[str, Any]] = v.get("variants", {})
    required = set(budgets.required)
    champ = None if champion is None else {k: float(x) for k, x in champion.items() if _finite(x)}
    measured = _measurements(v, merge_report)
    metrics = candidate_metrics(v, merge_report)

    # 1. Absolute budgets, one check per measured value (or per metric not measured).
    checks = [_budget_check(metric, m, budgets, metric.name in required) for metric, m in measured]
    # 2. Generated images must have content (not a metric: always 0).
    checks.append(_valid_images(variants) if variants else Check("variants", None, None, False, "the validation generated no images"))

    # 3. No regression against the champion beyond measurement noise.
    if champ is None:
        checks.append(Check("vs_champion", None, None, True,
                            "not measured (optional): no champion registered yet, nothing to regress against", "not_measured"))
    for metric, m in measured:
        if m.value is None or not _finite(m.value):
            continue
        reference = float(m.value)
        if champ is not None:
            check, reference = _champion_check(metric, m, budgets, champ)
            checks.append(check)
        metrics[f"reference/{m.key}"] = reference

    quantization = None
    if quantize_report is not None:
        quantization = quantization_choice(quantize_report)
        checks.append(_quantization_check(quantization))

    reasons = [_reason(c) for c in checks if not c.passed]
    not_evaluated = [
        {"name": c.name, "reason": c.detail, "required": not c.passed} for c in checks if c.verdict == "not_measured"
    ]
    return GateReport(
        passed=not reasons,
        checks=checks,
        reasons=reasons,
        metrics=metrics,
        champion=champ,
        candidate_info=dict(candidate_info or {}),
        not_evaluated=not_evaluated,
        required=sorted(required),
        quantization=quantization,
    )


def quantization_choice(q: Mapping[str, Any]) -> dict[str, Any]:
    """The choice of the quantization ladder (``reports/quantize.json``), as the gate reports it."""
    chosen = q.get("chosen")
    entry = next((e for e in q.get("levels", []) if e.get("level") == chosen), {}) if chosen else {}
    return {
        "level": chosen,
        "why": str(q.get("why") or "no reason recorded"),
        "mode": q.get("mode"),
        "target": (q.get("target") or {}).get("name"),
        "size_ratio": entry.get("size_ratio"),
        "passing": [e["level"] for e in q.get("levels", []) if e.get("passes")],
        "not_runnable": {e["level"]: e.get("reason") for e in q.get("levels", []) if not e.get("runs")},
    }


def _quantization_check(choice: Mapping[str, Any]) -> Check:
    ok = choice["level"] is not None
    ratio = choice.get("size_ratio")
    detail = (f"quantization level {choice['level']} chosen ({choice['mode']}, target {choice['target']}): {choice['why']}"
              if ok else f"no quantization level within the budgets (budgets.min_quantized_psnr, "
              f"budgets.max_style_gain_loss, merge.target_device): {choice['why']}")
    return Check("quantization", float(ratio) if _finite(ratio) else None, None, ok, detail)


def _reason(c: Check) -> str:
    value = "missing" if c.value is None else f"{c.value:.4g}"
    return f"{c.name} = {value}: {c.detail}"
