"""The promotion gate passes a candidate within every budget and names each violated one."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from stunning.config import BudgetsConfig, ConfigError, load_params
from stunning.gate import METRIC_NAMES, METRICS, candidate_metrics, evaluate

BUDGETS = BudgetsConfig(
    max_peak_memory_mb=4096,
    max_latency_s=5.0,
    min_style_gain=0.05,
    max_quantized_size_ratio=0.6,
    max_quantization_mse=0.01,
    # was max_regression_vs_champion=0.10: the same 0.05 leeway on a 0.5 champion, now as measurement noise
    noise_floor={**BudgetsConfig().noise_floor, "style_gain": 0.05},
)
MERGE = {"size_ratio": 0.3, "quantization_mse": 1e-5, "quantization_max_abs": 0.004, "fp32_denoiser_bytes": 100, "int8_denoiser_bytes": 30}


def variant(latency=0.2, memory=600.0, blank=0):
    return {"latency_s": latency, "peak_memory_mb": memory, "images": 8, "blank_images": blank,
            "style_distance": {"noir": 0.2, "impressionist": 0.3}, "distance_to_base": 0.1}


@pytest.fixture
def good() -> dict:
    return {
        "variants": {n: variant() for n in ("base", "adapter-noir", "adapter-impressionist", "fused", "quantized")},
        "style_gain": {"noir": 0.4, "impressionist": 0.3},
        "style_margin": {"noir": 0.1, "impressionist": 0.05},
        "adapters": {"noir": {"own_distance": 0.12, "base_distance": 0.2}},
    }


def failed_names(report) -> set[str]:
    return {c.name for c in report.checks if not c.passed}


def test_candidate_within_budgets_passes(good):
    rep = evaluate(good, MERGE, BUDGETS, champion=None)
    assert rep.passed and rep.reasons == []
    names = {c.name for c in rep.checks}
    assert {"style_gain/noir", "style_gain/impressionist", "peak_memory_mb", "latency_s", "valid_images",
            "quantized_size_ratio", "quantization_mse", "vs_champion"} <= names
    d = rep.to_dict()
    json.dumps(d)  # serialisable as-is
    assert set(d) >= {"passed", "checks", "reasons", "candidate"}
    assert set(d["checks"][0]) == {"name", "value", "threshold", "passed", "detail", "verdict"}  # + verdict (new)
    assert d["candidate"]["metrics"]["style_gain/noir"] == 0.4
    assert d["candidate"]["metrics"]["quantized_size_ratio"] == 0.3


def test_low_style_gain_blocks_and_names_the_style(good):
    good["style_gain"]["noir"] = 0.01
    rep = evaluate(good, MERGE, BUDGETS)
    assert not rep.passed
    assert failed_names(rep) == {"style_gain/noir"}
    assert len(rep.reasons) == 1 and rep.reasons[0].startswith("style_gain/noir")
    assert "min_style_gain" in rep.reasons[0]
    c = rep.check("style_gain/noir")
    assert (c.value, c.threshold, c.passed) == (0.01, 0.05, False)


def test_latency_and_memory_over_budget_name_the_worst_variant(good):
    good["variants"]["quantized"]["latency_s"] = 7.5
    good["variants"]["fused"]["peak_memory_mb"] = 5000.0
    rep = evaluate(good, MERGE, BUDGETS)
    assert failed_names(rep) == {"latency_s", "peak_memory_mb"}
    assert rep.check("latency_s").value == 7.5 and "quantized" in rep.check("latency_s").detail
    assert any("peak_memory_mb" in r and "fused" in r for r in rep.reasons)


def test_quantization_budgets_and_missing_merge_report(good):
    rep = evaluate(good, {**MERGE, "size_ratio": 0.9, "quantization_mse": 0.2}, BUDGETS)
    assert failed_names(rep) == {"quantized_size_ratio", "quantization_mse"}
    assert "int8 30 B / fp32 100 B" in rep.check("quantized_size_ratio").detail  # a report from before the ladder
    ladder = {**MERGE, "quantization": "int4", "quantized_denoiser_bytes": 16, "size_ratio": 0.16}
    rep = evaluate(good, ladder, BUDGETS)
    assert "int4 16 B / fp32 100 B" in rep.check("quantized_size_ratio").detail  # the chosen level, not int8
    assert "pixel MSE int4 vs fp32" in rep.check("quantization_mse").detail
    rep = evaluate(good, None, BUDGETS)
    assert failed_names(rep) == {"quantized_size_ratio", "quantization_mse"}
    assert "merge" in rep.reasons[0]


def _quantize_report(chosen):
    levels = [
        {"level": "int8", "runs": True, "reason": None, "size_ratio": 0.27, "passes": chosen == "int8", "failures": []},
        {"level": "int4", "runs": True, "reason": None, "size_ratio": 0.16, "passes": False,
         "failures": ["psnr 26.0 < 30 (half-half)"]},
        {"level": "nf4", "runs": False, "reason": "bitsandbytes CPU kernels fail", "size_ratio": None, "passes": False,
         "failures": ["does not run here"]},
    ]
    why = ("int8 is the smallest level that passes; smaller levels failed: int4: psnr 26.0 < 30 (half-half)"
           if chosen else "no level passes the budgets (PSNR >= 60 dB): int8: psnr 46.6 < 60 (half-half)")
    return {"mode": "auto", "target": {"name": "apple-8gb"}, "levels": levels, "chosen": chosen, "why": why}


def test_gate_report_carries_the_quantization_choice_and_why(good):
    rep = evaluate(good, MERGE, BUDGETS, quantize_report=_quantize_report("int8"))
    assert rep.passed, rep.reasons
    body = rep.to_dict()
    assert body["quantization"]["level"] == "int8" and "int4: psnr 26.0 < 30" in body["quantization"]["why"]
    assert body["quantization"]["not_runnable"] == {"nf4": "bitsandbytes CPU kernels fail"}
    assert rep.check("quantization").verdict == "pass" and rep.check("quantization").value == pytest.approx(0.27)


def test_no_passing_quantization_level_blocks_with_the_reason(good):
    rep = evaluate(good, MERGE, BUDGETS, quantize_report=_quantize_report(None))
    assert not rep.passed and rep.to_dict()["quantization"]["level"] is None
    assert any(r.startswith("quantization = missing") and "psnr 46.6 < 60" in r for r in rep.reasons)


def test_blank_or_nan_outputs_block(good):
    good["variants"]["fused"]["blank_images"] = 2
    rep = evaluate(good, MERGE, BUDGETS)
    assert failed_names(rep) == {"valid_images"}
    assert "fused" in rep.check("valid_images").detail
    good2 = copy.deepcopy(good)
    good2["variants"]["fused"]["blank_images"] = 0
    good2["style_gain"]["impressionist"] = math.nan  # a NaN metric never passes
    assert failed_names(evaluate(good2, MERGE, BUDGETS)) == {"style_gain/impressionist"}


def test_regression_vs_champion(good):
    # noir 0.4 vs champion 0.5: 0.1 worse > the 0.05 noise band; impressionist 0.3 vs 0.32: 0.02 worse, fine
    champion = {"style_gain/noir": 0.5, "style_gain/impressionist": 0.32}
    rep = evaluate(good, MERGE, BUDGETS, champion=champion)
    assert failed_names(rep) == {"vs_champion/style_gain/noir"}
    c = rep.check("vs_champion/style_gain/noir")
    assert c.threshold == pytest.approx(0.45) and c.value == 0.4
    assert "champion" in rep.reasons[0]
    assert rep.to_dict()["champion"] == champion
    # the same candidate against a weaker champion passes; a new style is not held back
    rep = evaluate(good, MERGE, BUDGETS, champion={"style_gain/noir": 0.42})
    assert rep.passed
    assert rep.check("vs_champion/style_gain/impressionist").passed


def test_no_adapters_is_not_a_pass(good):
    good["style_gain"] = {}
    rep = evaluate(good, MERGE, BUDGETS)
    assert not rep.passed and "style_gain" in failed_names(rep)


def test_candidate_metrics_are_flat_numbers(good):
    m = candidate_metrics(good, MERGE)
    assert m["style_gain/impressionist"] == 0.3 and m["style_margin/noir"] == 0.1
    assert m["latency_s"] == 0.2 and m["blank_images"] == 0
    assert all(isinstance(v, float) for v in m.values())


def test_adherence_drop_is_checked_only_on_attributes_the_style_keeps(good):
    good["readable_attributes"] = {"impressionist": ["colour", "garment"], "noir": []}
    good["adherence_drop"] = {"impressionist": 0.05}
    rep = evaluate(good, MERGE, BUDGETS)
    assert rep.passed
    check = next(c for c in rep.checks if c.name == "adherence_drop/impressionist")
    assert check.value == 0.05 and check.threshold == BUDGETS.max_adherence_drop and "colour, garment" in check.detail
    noir = next(c for c in rep.checks if c.name == "adherence_drop/noir")  # nothing readable in noir
    assert noir.passed and noir.value is None and "cannot read" in noir.detail
    assert rep.metrics["adherence_drop/impressionist"] == 0.05

    good["adherence_drop"]["impressionist"] = 0.3  # the adapter forgets the prompt
    rep = evaluate(good, MERGE, BUDGETS)
    assert not rep.passed and failed_names(rep) == {"adherence_drop/impressionist"}
    assert any(r.startswith("adherence_drop/impressionist = 0.3") for r in rep.reasons)


def test_adherence_is_reported_as_not_measurable_for_free_form_prompts(good):
    rep = evaluate(good, MERGE, BUDGETS)  # no readable_attributes: prompts outside the world's grammar
    check = next(c for c in rep.checks if c.name == "adherence_drop")
    assert check.passed and "not measurable" in check.detail


# --------------------------------------------------------------------------- every metric vs its budget and the champion

LOOSE = BudgetsConfig(  # absolute budgets out of the way: only the champion comparison decides
    max_peak_memory_mb=1e9, max_latency_s=1e9, min_style_gain=-1e9, max_adherence_drop=1e9,
    max_quantized_size_ratio=1e9, max_quantization_mse=1e9,
)


@pytest.fixture
def full(good) -> dict:
    """`good` with every gate metric measured (eval loss, adherence on both styles)."""
    good["eval_loss"] = {"noir": {"base": 0.30, "adapter": 0.20}, "impressionist": {"base": 0.32, "adapter": 0.25}}
    good["readable_attributes"] = {"noir": ["garment"], "impressionist": ["colour", "garment"]}
    good["adherence_drop"] = {"noir": 0.0, "impressionist": 0.02}
    good["clip"] = {"measured": True, "model": "tiny-clip", "styles": {
        "noir": {"style_gain": 0.05, "adherence_drop": 0.01},
        "impressionist": {"style_gain": 0.03, "adherence_drop": 0.0},
    }}
    return good


def _set(metric: str, validation: dict, merge: dict, value: float) -> str:
    """Set `metric` (noir's, for a per-style one) in the reports; return its flat key."""
    if metric == "style_gain":
        validation["style_gain"]["noir"] = value
        return "style_gain/noir"
    if metric == "eval_loss":
        validation["eval_loss"]["noir"]["adapter"] = value
        return "eval_loss/noir"
    if metric == "adherence_drop":
        validation["adherence_drop"]["noir"] = value
        return "adherence_drop/noir"
    if metric.startswith("clip_"):
        validation["clip"]["styles"]["noir"][metric.removeprefix("clip_")] = value
        return f"{metric}/noir"
    if metric in ("peak_memory_mb", "latency_s"):
        validation["variants"]["fused"][metric] = value
        return metric
    merge["size_ratio" if metric == "quantized_size_ratio" else metric] = value
    return metric


# (metric, a value within the test budgets, one beyond them); every budgeted row of the table
ABSOLUTE = [
    ("style_gain", 0.06, 0.04),
    ("adherence_drop", 0.09, 0.11),
    ("peak_memory_mb", 4000.0, 4100.0),
    ("latency_s", 4.9, 5.1),
    ("quantized_size_ratio", 0.59, 0.61),
    ("quantization_mse", 0.009, 0.011),
]


def test_the_table_covers_every_metric_once():
    assert len(set(METRIC_NAMES)) == len(METRICS)
    assert {name for name, *_ in ABSOLUTE} == {m.name for m in METRICS if m.budget}
    # compared with the champion only
    assert {m.name for m in METRICS if m.budget is None} == {"eval_loss", "clip_style_gain", "clip_adherence_drop"}
    assert set(BudgetsConfig().noise_floor) == set(METRIC_NAMES)  # every metric has a noise floor
    lower = {m.name for m in METRICS if not m.higher_is_better}
    assert lower == set(METRIC_NAMES) - {"style_gain", "clip_style_gain"}


@pytest.mark.parametrize(("metric", "ok", "bad"), ABSOLUTE, ids=[a[0] for a in ABSOLUTE])
def test_absolute_budget_on_every_metric_both_directions(full, metric, ok, bad):
    merge = dict(MERGE)
    key = _set(metric, full, merge, ok)
    rep = evaluate(full, merge, BUDGETS)
    assert rep.passed, rep.reasons
    assert rep.check(key).verdict == "pass" and rep.check(key).value == ok
    key = _set(metric, full, merge, bad)
    rep = evaluate(full, merge, BUDGETS)
    assert not rep.passed and failed_names(rep) == {key}
    assert rep.check(key).verdict == "fail" and rep.reasons[0].startswith(f"{key} = ")
    assert f"budgets.{next(m.budget for m in METRICS if m.name == metric)}" in rep.reasons[0]


def test_eval_loss_has_no_absolute_budget_but_is_recorded(full):
    rep = evaluate(full, MERGE, BUDGETS)
    c = rep.check("eval_loss/noir")
    assert (c.value, c.threshold, c.verdict) == (0.20, None, "pass") and "base 0.3" in c.detail
    assert rep.metrics["eval_loss/noir"] == 0.20 and rep.metrics["eval_loss/impressionist"] == 0.25
    full["eval_loss"]["noir"]["adapter"] = math.nan
    assert failed_names(evaluate(full, MERGE, BUDGETS)) == {"eval_loss/noir"}
    # the validation's own format: measured flag, reason, per-repeat spread of the adapter's loss
    full["eval_loss"] = {
        "noir": {"measured": True, "base": 0.3, "base_std": 0.01, "adapter": 0.2, "adapter_std": 0.004, "gain": 0.33},
        "impressionist": {"measured": False, "reason": "no val images of 'impressionist'"},
    }
    rep = evaluate(full, MERGE, BUDGETS, champion={"eval_loss/noir": 0.2})
    assert rep.metrics["spread/eval_loss/noir"] == 0.004
    assert rep.check("eval_loss/impressionist").verdict == "not_measured" and "no val images" in rep.check("eval_loss/impressionist").detail
    assert rep.check("vs_champion/eval_loss/noir").threshold == pytest.approx(0.2 * 1.05)  # max(2 x 0.004, 5 %)


METRIC_ROWS = [m.name for m in METRICS]


@pytest.mark.parametrize("metric", METRIC_ROWS)
def test_champion_comparison_on_every_metric_both_directions(full, metric):
    """Champion = the candidate itself; then the same metric a little better, within the
    noise band worse, and two bands worse (blocked, by that comparison alone)."""
    merge = dict(MERGE)
    base = evaluate(full, merge, LOOSE)
    assert base.passed, base.reasons
    champion = dict(base.metrics)
    key = _set(metric, copy.deepcopy(full), dict(merge), 0.0)  # its flat key
    row = next(m for m in METRICS if m.name == metric)
    ref = champion[key]
    same = evaluate(full, merge, LOOSE, champion=champion)
    c = same.check(f"vs_champion/{key}")
    assert same.passed and c.verdict == "pass"
    band = abs(c.threshold - ref)
    assert band > 0 and c.threshold == pytest.approx(ref - band if row.higher_is_better else ref + band)
    sign = 1 if row.higher_is_better else -1  # +: better
    for delta, ok in ((+2 * band, True), (-0.5 * band, True), (-2 * band, False)):
        _set(metric, full, merge, ref + sign * delta)
        rep = evaluate(full, merge, LOOSE, champion=champion)
        assert rep.passed is ok, (delta, rep.reasons)
        assert rep.check(f"vs_champion/{key}").verdict == ("pass" if ok else "fail")
        if not ok:
            assert failed_names(rep) == {f"vs_champion/{key}"}
            assert "champion" in rep.reasons[0] and "noise band" in rep.reasons[0]


def test_doubling_memory_under_the_budget_is_blocked_against_the_champion(good):
    champion = evaluate(good, MERGE, BUDGETS).metrics  # 600 MB
    good["variants"]["fused"]["peak_memory_mb"] = 1200.0  # well under the 4096 MB budget
    rep = evaluate(good, MERGE, BUDGETS, champion=champion)
    assert rep.check("peak_memory_mb").passed
    assert failed_names(rep) == {"vs_champion/peak_memory_mb"}
    assert rep.check("vs_champion/peak_memory_mb").threshold == pytest.approx(600 + 64)  # max(64 MB, 10 %)


def test_champion_without_a_metric_is_not_a_pass_and_does_not_block(full):
    rep = evaluate(full, MERGE, BUDGETS, champion={"style_gain/noir": 0.4})
    c = rep.check("vs_champion/latency_s")
    assert c.verdict == "not_measured" and c.passed
    assert {"name": "vs_champion/latency_s", "reason": c.detail, "required": False} in rep.to_dict()["not_evaluated"]
    assert rep.passed


# --------------------------------------------------------------------------- not measured


def test_not_measured_is_its_own_verdict_listed_with_its_reason(good):
    rep = evaluate(good, MERGE, BUDGETS)  # free-form prompts, no eval loss, no champion
    d = rep.to_dict()
    listed = {x["name"]: x for x in d["not_evaluated"]}
    assert set(listed) == {"adherence_drop", "eval_loss", "clip_style_gain", "clip_adherence_drop", "vs_champion"}
    assert all(x["required"] is False for x in listed.values()) and rep.passed
    assert "grammar" in listed["adherence_drop"]["reason"] and "eval_loss" in listed["eval_loss"]["reason"]
    for name in listed:
        c = rep.check(name)
        assert c.verdict == "not_measured" and c.value is None
    assert d["required"] == sorted(BUDGETS.required)
    assert all(c["verdict"] in ("pass", "fail", "not_measured") for c in d["checks"])
    assert all(c["passed"] == (c["verdict"] == "pass") for c in d["checks"] if c["verdict"] != "not_measured")


@pytest.mark.parametrize("metric", ["adherence_drop", "eval_loss"])
def test_a_required_metric_that_was_not_measured_blocks(good, metric):
    budgets = BUDGETS.model_copy(update={"required": [*BUDGETS.required, metric]})
    rep = evaluate(good, MERGE, budgets)
    assert not rep.passed and failed_names(rep) == {metric}
    c = rep.check(metric)
    assert c.verdict == "not_measured" and c.passed is False and "required" in c.detail
    assert rep.reasons[0].startswith(f"{metric} = missing: not measured (required")
    assert {"name": metric, "reason": c.detail, "required": True} in rep.to_dict()["not_evaluated"]


def test_a_required_metric_missing_for_one_style_blocks_only_where_required(full):
    del full["eval_loss"]["impressionist"]
    assert evaluate(full, MERGE, BUDGETS).passed  # eval_loss optional by default
    budgets = BUDGETS.model_copy(update={"required": [*BUDGETS.required, "eval_loss"]})
    rep = evaluate(full, MERGE, budgets)
    assert failed_names(rep) == {"eval_loss/impressionist"} and "no eval_loss" in rep.reasons[0]


def test_missing_merge_report_is_not_measured_and_blocks_because_required(good):
    rep = evaluate(good, None, BUDGETS)
    for name in ("quantized_size_ratio", "quantization_mse"):
        assert rep.check(name).verdict == "not_measured" and not rep.check(name).passed
    optional = BUDGETS.model_copy(update={"required": ["style_gain", "peak_memory_mb", "latency_s"]})
    rep = evaluate(good, None, optional)
    assert rep.passed and {x["name"] for x in rep.not_evaluated} >= {"quantized_size_ratio", "quantization_mse"}


def test_unknown_metric_in_budgets_is_a_config_error(good):
    with pytest.raises(ConfigError, match=r"budgets\.required.*styel_gain"):
        evaluate(good, MERGE, BUDGETS.model_copy(update={"required": ["styel_gain"]}))
    with pytest.raises(ConfigError, match=r"budgets\.noise_floor"):
        evaluate(good, MERGE, BUDGETS.model_copy(update={"noise_floor": {"fid": 1.0}}))


# --------------------------------------------------------------------------- the noise band


def test_noise_band_comes_from_the_reported_spread(good):
    champion = {"style_gain/noir": 0.5}
    good["style_gain"]["noir"] = 0.42
    assert "vs_champion/style_gain/noir" in failed_names(evaluate(good, MERGE, BUDGETS, champion=champion))  # floor 0.05
    good["spread"] = {"style_gain": {"noir": 0.05}}  # per-seed std: 2 sigma = 0.1 > the floor
    rep = evaluate(good, MERGE, BUDGETS, champion=champion)
    c = rep.check("vs_champion/style_gain/noir")
    assert rep.passed and c.threshold == pytest.approx(0.4) and "2 sigma" in c.detail
    assert rep.metrics["spread/style_gain/noir"] == 0.05  # tagged, so the next run knows the champion's spread
    # a flat key and the <metric>_std form read the same; candidate and champion spreads add in quadrature
    del good["spread"]
    good["style_gain_std"] = {"noir": 0.03}
    rep = evaluate(good, MERGE, BUDGETS, champion={**champion, "spread/style_gain/noir": 0.04})
    assert rep.check("vs_champion/style_gain/noir").threshold == pytest.approx(0.5 - 2 * 0.05)
    # a tiny spread never narrows the band below the floor
    good["style_gain_std"] = {"noir": 0.001}
    assert evaluate(good, MERGE, BUDGETS, champion=champion).check("vs_champion/style_gain/noir").threshold == pytest.approx(0.45)
    # noise_sigmas scales it
    good["style_gain_std"] = {"noir": 0.05}
    k3 = BUDGETS.model_copy(update={"noise_sigmas": 3.0})
    assert evaluate(good, MERGE, k3, champion=champion).check("vs_champion/style_gain/noir").threshold == pytest.approx(0.35)


def test_spread_of_a_variant_metric(good):
    good["variants"]["fused"]["latency_s"] = 0.3
    good["variants"]["fused"]["latency_s_std"] = 0.1
    rep = evaluate(good, MERGE, BUDGETS, champion={"latency_s": 0.2})
    assert rep.passed and rep.check("vs_champion/latency_s").threshold == pytest.approx(0.4)


def test_reference_moves_only_on_an_improvement_beyond_the_band(good):
    champion = {"style_gain/noir": 0.5, "reference/style_gain/noir": 0.5}
    good["style_gain"]["noir"] = 0.53  # better, but within noise: the reference stays
    assert evaluate(good, MERGE, BUDGETS, champion=champion).metrics["reference/style_gain/noir"] == 0.5
    good["style_gain"]["noir"] = 0.47  # worse within noise: promoted, reference stays
    rep = evaluate(good, MERGE, BUDGETS, champion=champion)
    assert rep.passed and rep.metrics["reference/style_gain/noir"] == 0.5
    good["style_gain"]["noir"] = 0.6  # a real improvement: the new reference
    assert evaluate(good, MERGE, BUDGETS, champion=champion).metrics["reference/style_gain/noir"] == 0.6
    # the champion's reference, not its raw value, is what is compared with
    rep = evaluate(good, MERGE, BUDGETS, champion={"style_gain/noir": 0.46, "reference/style_gain/noir": 0.7})
    assert "vs_champion/style_gain/noir" in failed_names(rep) and "reference 0.7" in rep.reasons[0]
    # without a champion, a candidate is its own reference
    assert evaluate(good, MERGE, BUDGETS).metrics["reference/style_gain/noir"] == 0.6


@pytest.mark.parametrize("metric", ["style_gain", "latency_s"])
def test_promotions_each_slightly_worse_cannot_drift(good, metric):
    """Each night's candidate is a little worse than the current champion (inside the noise
    band); whenever it is promoted it becomes the champion (its report's metrics, as the
    registry tags them). The old rule drifts without bound; the new one stops within one
    band of the first champion."""
    row = next(m for m in METRICS if m.name == metric)
    merge = dict(MERGE)
    key = _set(metric, good, merge, 0.5)
    champion = dict(evaluate(good, merge, BUDGETS).metrics)  # the first champion
    start = champion[key]
    sign = 1 if row.higher_is_better else -1  # +: better
    band = abs(evaluate(good, merge, BUDGETS, champion=champion).check(f"vs_champion/{key}").threshold - start)

    def worse(value: float) -> float:  # slightly worse: inside the new band and inside the old 10 %
        return value - sign * min(0.6 * band, 0.09 * abs(value))

    old_champion = start  # the old rule: each promotion may be 10 % worse than the last; it adds up
    for _ in range(20):
        candidate = worse(old_champion)
        if (candidate >= old_champion - 0.10 * abs(old_champion)) if row.higher_is_better else (
            candidate <= old_champion + 0.10 * abs(old_champion)
        ):
            old_champion = candidate
    assert sign * (start - old_champion) > 3 * band

    promoted = [start]
    for _ in range(20):
        candidate = worse(champion[key])
        _set(metric, good, merge, candidate)
        rep = evaluate(good, merge, BUDGETS, champion=champion)
        if rep.passed:
            champion = dict(rep.metrics)  # the promoted candidate is the next champion
            promoted.append(candidate)
    worst = min(promoted) if row.higher_is_better else max(promoted)
    assert 2 <= len(promoted) < 5  # a step or two inside the noise, then each next one is a regression
    assert sign * (start - worst) <= band + 1e-12  # never more than one band below the first champion
    assert champion[f"reference/{key}"] == start

    # the reference is what stops it: a champion tagged without one (its raw value) drifts
    champion = {key: start}
    for _ in range(5):
        _set(metric, good, merge, champion[key] - sign * 0.6 * band)
        rep = evaluate(good, merge, BUDGETS, champion=champion)
        assert rep.passed
        champion = {key: rep.metrics[key]}
    assert sign * (start - champion[key]) > 2 * band


# --------------------------------------------------------------------------- config and shipped defaults


def test_removed_max_regression_vs_champion_says_what_to_use(tmp_path):
    import yaml

    repo = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((repo / "params.yaml").read_text())
    data["budgets"]["max_regression_vs_champion"] = 0.10
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"budgets\.max_regression_vs_champion was removed.*noise_floor"):
        load_params(path)


def test_shipped_budgets_promote_the_measured_default_run_and_its_rerun(good):
    """The measured default run (style gain impressionist 0.55, noir 0.61) passes the shipped
    budgets with no champion, and a rerun with timing noise passes against it."""
    shipped = BudgetsConfig()
    good["style_gain"] = {"impressionist": 0.55, "noir": 0.61}
    good["readable_attributes"] = {"impressionist": ["colour"], "noir": []}
    good["adherence_drop"] = {"impressionist": 0.05}
    first = evaluate(good, MERGE, shipped)
    assert first.passed, first.reasons
    assert {x["name"] for x in first.not_evaluated} == {
        "adherence_drop/noir", "eval_loss", "clip_style_gain", "clip_adherence_drop", "vs_champion"}
    good["variants"]["fused"]["latency_s"] = 0.24  # 20 % slower on a busy machine
    good["variants"]["fused"]["peak_memory_mb"] = 640.0
    good["style_gain"]["noir"] = 0.59
    rerun = evaluate(good, MERGE, shipped, champion=first.metrics)
    assert rerun.passed, rerun.reasons


def test_clip_scores_are_optional_and_named(full):
    """Without validate.clip_model the CLIP metrics are listed as not evaluated (never a pass,
    never blocking unless required); measured, they are per style and name the model."""
    good = copy.deepcopy(full)
    good["clip"] = {"measured": False, "reason": "validate.clip_model is not set"}
    rep = evaluate(good, MERGE, BUDGETS)
    assert rep.passed
    assert rep.check("clip_style_gain").verdict == "not_measured"
    assert "validate.clip_model is not set" in rep.check("clip_style_gain").detail
    assert {x["name"] for x in rep.to_dict()["not_evaluated"]} >= {"clip_style_gain", "clip_adherence_drop"}
    required = BUDGETS.model_copy(update={"required": [*BUDGETS.required, "clip_style_gain"]})
    rep = evaluate(good, MERGE, required)
    assert not rep.passed and any(r.startswith("clip_style_gain") for r in rep.reasons)
    rep = evaluate(full, MERGE, required)
    assert rep.passed, rep.reasons
    c = rep.check("clip_style_gain/noir")
    assert (c.value, c.verdict) == (0.05, "pass") and "tiny-clip" in c.detail
    assert rep.metrics["clip_adherence_drop/impressionist"] == 0.0
