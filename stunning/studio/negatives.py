"""Negative-prompt optimizer: find a negative prompt that measurably helps a style or blend.

A negative prompt replaces the empty prompt in classifier-free guidance, so it steers every
image away from what it describes; whether that helps a given adapter is an empirical
question (on the embedded micro model most negatives make the style distance *worse*: the
empty prompt is what the model was trained to be unconditional on). This module answers it
with the project's validation measurements instead of folklore:

* **Candidates** — single terms from a vocabulary (:data:`DEFAULT_VOCABULARY`, extendable
  with a user's file) plus words for the target's own failure modes: the style features
  (:mod:`stunning.metrics`) on which the empty-negative images differ most from the style's
  references, the same per-feature terms validation reports as ``style_residual``, mapped
  by the *direction* of the difference to words (:data:`FAILURE_WORDS`: too saturated ->
  "oversaturated, colourful"; too flat -> "low contrast, washed out"; ...).
* **Search** — every single term is scored on the *search* prompts, then the best few are
  combined greedily ("a, b", "a, b, c") while that helps, within ``max_candidates``
  evaluations. Every candidate is drawn on the same fixed seeds as the empty negative.
* **Scores** (:func:`score`) — as validation measures: the style distance of the images to
  the style's reference images (curated train + val; a blend: the weight-averaged distance
  to its styles' references), expressed against the base model's distance as a style gain
  so the gate's noise band applies; prompt adherence by the analytic oracle on the
  attributes the style keeps readable (prompts outside the embedded world's grammar: not
  measured, never guessed); image validity (no NaN/blank/clipped images).
* **Decision** (:func:`decide`, pure, shaped like :func:`stunning.gate.evaluate`) — on the
  *held-out* prompts, the best search candidate must improve some measured metric by more
  than the gate's noise band (``budgets.noise_floor``/``noise_floor_relative`` of
  ``style_gain`` and ``adherence_drop``) and make none worse by more than it, nor add an
  invalid image; otherwise the verdict is ``"no improvement"`` and nothing is saved.

:func:`write_report` writes ``negatives.json``, ``negatives.md`` and ``grid.png`` (held-out
prompts x seeds; empty vs best) atomically. :func:`save_default_negative` stores a winner in
``<root>/studio/negatives.yaml`` with its evidence; :func:`default_negative` is what the
server/UI read (a request's explicit ``negative_prompt`` wins; ``""`` means none).
"""

from __future__ import annotations

import csv
import datetime as _dt
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stunning import metrics
from stunning.io import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)

# Terms people put in negative prompts for photographic/illustrative styles.
DEFAULT_VOCABULARY: tuple[str, ...] = (
    "blurry",
    "oversaturated",
    "washed out",
    "jpeg artifacts",
    "low contrast",
    "colour cast",
    "noise",
    "overexposed",
    "underexposed",
    "grain",
    "soft",
    "dark corners",
)

# (feature, +1 if the generations have *more* of it than the references, -1 if less) -> words
# that describe the unwanted excess/lack, i.e. what to steer away from.
FAILURE_WORDS: dict[tuple[str, int], tuple[str, ...]] = {
    ("saturation_mean", +1): ("oversaturated", "colour cast", "sepia"),
    ("saturation_mean", -1): ("washed out", "desaturated"),
    ("saturation_std", +1): ("colour cast", "sepia", "colourful"),
    ("saturation_std", -1): ("flat colour",),
    ("colourfulness", +1): ("oversaturated", "colour cast", "sepia"),
    ("colourfulness", -1): ("dull", "washed out"),
    ("hue_entropy", +1): ("multicoloured", "rainbow"),
    ("hue_entropy", -1): ("colour cast", "sepia"),
    ("luma_mean", +1): ("overexposed", "bright"),
    ("luma_mean", -1): ("underexposed", "dark"),
    ("luma_std", +1): ("harsh contrast",),
    ("luma_std", -1): ("low contrast", "flat"),
    ("tonal_extremes", +1): ("harsh contrast", "clipped"),
    ("tonal_extremes", -1): ("low contrast", "faded"),
    ("grain", +1): ("noise", "grain"),
    ("grain", -1): ("blurry", "soft"),
    ("edge_density", +1): ("busy", "sharp edges"),
    ("edge_density", -1): ("blurry", "soft"),
    ("vignette", +1): ("dark corners", "vignette"),
    ("vignette", -1): ("bright corners", "flat light"),
}

CLIPPED_SHARE = 0.95  # an image with this share of its pixel values at 0 or 255 is clipped (invalid)
METRIC_BAND = {"style_gain": "style_gain", "adherence": "adherence_drop"}  # our metric -> gate metric of its band


class NegativesInputError(ValueError):
    """An input the optimizer needs is missing or malformed; the message says what to do."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SearchConfig:
    """How hard to search: at most ``max_candidates`` single terms (failure-mode words first,
    then the vocabulary) are scored on the search prompts, then the best ``combine_top`` of
    those that helped are combined greedily (at most ``combine_top - 1`` more evaluations, up to
    ``max_terms`` terms per negative prompt)."""

    seeds: tuple[int, ...] = (0, 1)
    steps: int = 16
    guidance_scale: float = 4.0
    max_candidates: int = 12
    combine_top: int = 3
    max_terms: int = 3
    failure_features: int = 3  # how many residual features contribute failure-mode words
    adapter_prompt: str = "{prompt}, {style} style"  # validate.adapter_prompt


@dataclass(frozen=True)
class Target:
    """A style (one adapter folder) or a blend (weights over adapter folders)."""

    kind: str  # "style" | "blend"
    name: str
    adapters: dict[str, Path]  # style name -> adapter folder
    weights: dict[str, float]

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"

    @classmethod
    def style(cls, name: str, adapter_dir: str | Path) -> Target:
        return cls("style", name, {name: Path(adapter_dir)}, {name: 1.0})

    @classmethod
    def blend(cls, weights: Mapping[str, float], adapters_dir: str | Path, name: str | None = None) -> Target:
        if not weights or not any(w > 0 for w in weights.values()):
            raise NegativesInputError("a blend needs at least one style with a positive weight, e.g. impressionist=0.5,noir=0.5")
        w = {s: float(x) for s, x in sorted(weights.items())}
        return cls("blend", name or blend_name(w), {s: Path(adapters_dir) / s for s in w}, w)


def blend_name(weights: Mapping[str, float]) -> str:
    """The canonical name of an unnamed blend: ``impressionist=0.5,noir=0.5``."""
    return ",".join(f"{s}={float(w):g}" for s, w in sorted(weights.items()))


def target_key(style: str | None = None, blend: str | None = None, weights: Mapping[str, float] | None = None) -> str:
    """The store key of a target: ``style:<name>``, ``blend:<name>`` or ``blend:<a=w,b=w>``."""
    if sum(x is not None for x in (style, blend, weights)) != 1:
        raise ValueError("give exactly one of style, blend or weights")
    if style is not None:
        return f"style:{style}"
    if blend is not None:
        return f"blend:{blend}"
    return f"blend:{blend_name(weights or {})}"


def read_vocabulary(path: str | Path) -> list[str]:
    """One term per line (``#`` comments and blank lines ignored)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise NegativesInputError(f"{path}: cannot read the vocabulary file ({exc}); give a UTF-8 text file, one term a line") from None
    return [t for t in (line.split("#", 1)[0].strip() for line in lines) if t]


def split_prompts(prompts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Search and held-out prompts: alternate prompts, so both halves span the list."""
    prompts = [p for p in (str(x).strip() for x in prompts) if p]
    if len(prompts) < 2:
        raise NegativesInputError(
            f"{len(prompts)} prompt(s): need at least 2 (half to search on, half to report on), one a line"
        )
    return prompts[0::2], prompts[1::2]


# --------------------------------------------------------------------------- references


@dataclass
class References:
    """Per style of the target: reference features and the oracle-readable attributes."""

    features: dict[str, np.ndarray]
    readable: dict[str, list[str]]


def load_references(data_dir: str | Path, styles: Sequence[str]) -> References:
    """The curated train + val images of each style (as validation's reference sets)."""
    from stunning.validation import READABLE_ACCURACY, REFERENCE_SPLITS

    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        raise NegativesInputError(f"{manifest} not found: give the curated data folder (run the curate stage)")
    paths: dict[str, list[Path]] = {s: [] for s in styles}
    captions: dict[str, list[str]] = {s: [] for s in styles}
    with manifest.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("style") in paths and row.get("split") in REFERENCE_SPLITS:
                paths[row["style"]].append(data_dir / row["path"])
                captions[row["style"]].append((row.get("caption") or "").strip())
    empty = [s for s, p in paths.items() if not p]
    if empty:
        raise NegativesInputError(f"{manifest}: no train/val images of style(s) {empty}; the style distance needs references")
    readable: dict[str, list[str]] = {}
    from stunning.data import oracle

    for s in styles:
        try:
            images = [Image.open(p).convert("RGB") for p in paths[s]]
            acc = oracle.adherence(images, captions[s])
        except ValueError:  # captions outside the embedded grammar: adherence is not measurable
            readable[s] = []
            continue
        readable[s] = [a for a in oracle.ATTRIBUTES if acc.get(a, 0.0) >= READABLE_ACCURACY]
    return References({s: metrics.features(p) for s, p in paths.items()}, readable)


# --------------------------------------------------------------------------- scoring


def is_clipped(img: Image.Image, share: float = CLIPPED_SHARE) -> bool:
    """True when nearly every pixel value is 0 or 255 (a burnt-out or crushed image)."""
    arr = np.asarray(img.convert("RGB"))
    return bool(((arr == 0) | (arr == 255)).mean() >= share)


@dataclass
class Scores:
    """One candidate's measurements on one prompt set (see :func:`score`)."""

    style_distance: float
    style_gain: float  # 1 - distance / base distance (the gate's style_gain, on these prompts)
    adherence: float | None
    adherence_reason: str
    invalid_images: int
    images: int
    residual: dict[str, float] = field(default_factory=dict)  # signed per-feature mean differences, top terms

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("style_distance", "style_gain", "adherence"):
            if out[k] is not None:
                out[k] = round(float(out[k]), 6)
        out["residual"] = {k: round(v, 6) for k, v in self.residual.items()}
        if self.adherence is None:
            out["adherence"] = {"measured": False, "reason": self.adherence_reason}
        out.pop("adherence_reason")
        return out


def _distance(feats: np.ndarray, target: Target, refs: References) -> float:
    total = sum(w for w in target.weights.values() if w > 0)
    return float(sum(w * metrics.set_distance(feats, refs.features[s]) for s, w in target.weights.items() if w > 0) / total)


def readable_attributes(target: Target, refs: References) -> list[str]:
    """Attributes the oracle reads on every (positively weighted) style of the target."""
    sets = [set(refs.readable.get(s, [])) for s, w in target.weights.items() if w > 0]
    common = set.intersection(*sets) if sets else set()
    from stunning.data import oracle

    return [a for a in oracle.ATTRIBUTES if a in common]


def score(
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    target: Target,
    refs: References,
    base_distance: float,
    failure_features: int = 3,
) -> Scores:
    """Style distance/gain, adherence and validity of `images` drawn from `prompts`."""
    feats = metrics.features(images)
    d = _distance(feats, target, refs)
    attrs = readable_attributes(target, refs)
    adherence, reason = None, ""
    if not attrs:
        reason = f"the oracle reads no attribute on the references of {sorted(target.weights)} (or their captions are not in its grammar)"
    else:
        from stunning.data import oracle

        try:
            acc = oracle.adherence(list(images), list(prompts))
            adherence = float(np.mean([acc[a] for a in attrs]))
        except ValueError:
            reason = "the prompts are not in the embedded world's grammar: adherence is not measurable"
    invalid = sum(metrics.is_blank(im) or is_clipped(im) for im in images)
    # Signed residual: where the images differ most from the (weight-pooled) references.
    ref_all = np.concatenate([refs.features[s] for s, w in target.weights.items() if w > 0])
    terms = metrics.feature_contributions(feats, ref_all)
    diff = feats.mean(0) - ref_all.mean(0)
    top = sorted(terms, key=lambda k: -terms[k])[:failure_features]
    residual = {k: float(diff[metrics.FEATURES.index(k)]) for k in top}
    return Scores(d, metrics.style_gain(d, base_distance), adherence, reason, int(invalid), len(images), residual)


def failure_terms(residual: Mapping[str, float]) -> list[str]:
    """Words for the failure modes in a signed residual (:attr:`Scores.residual`), in order."""
    out: list[str] = []
    for feature, delta in residual.items():
        for word in FAILURE_WORDS.get((feature, 1 if delta > 0 else -1), ()):
            if word not in out:
                out.append(word)
    return out


# --------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class MetricChange:
    metric: str
    before: float | None
    after: float | None
    delta: float | None  # after - before, higher is better
    band: float
    verdict: str  # better | worse | same | not_measured
    detail: str


def _band(metric: str, reference: float, budgets: Any) -> float:
    gate_name = METRIC_BAND[metric]
    return float(max(budgets.noise_floor.get(gate_name, 0.0), budgets.noise_floor_relative.get(gate_name, 0.0) * abs(reference)))


def decide(before: Scores, after: Scores, budgets: Any) -> tuple[str, list[MetricChange]]:
    """``("improvement" | "no improvement", changes)``: a pure function of two held-out scores.

    Improvement: some measured metric better by more than its band and none worse by more
    than its band, and no more invalid images than the empty negative. Bands are the gate's
    floors for the corresponding gate metric (style_gain; adherence uses adherence_drop's).
    """
    changes: list[MetricChange] = []
    for metric in ("style_gain", "adherence"):
        b, a = getattr(before, metric), getattr(after, metric)
        if b is None or a is None:
            changes.append(MetricChange(metric, b, a, None, 0.0, "not_measured",
                                        before.adherence_reason or after.adherence_reason or "not measured"))
            continue
        band = _band(metric, b, budgets)
        delta = a - b
        verdict = "better" if delta > band else "worse" if delta < -band else "same"
        changes.append(MetricChange(metric, b, a, delta, band, verdict,
                                    f"{metric} {b:.4g} -> {a:.4g} ({delta:+.4g}; noise band ±{band:.4g} from budgets)"))
    extra = after.invalid_images - before.invalid_images
    changes.append(MetricChange(
        "invalid_images", float(before.invalid_images), float(after.invalid_images), float(-extra), 0.0,
        "worse" if extra > 0 else "better" if extra < 0 else "same",
        f"NaN/blank/clipped images {before.invalid_images} -> {after.invalid_images} (must not grow)",
    ))
    improved = any(c.verdict == "better" for c in changes)
    worse = any(c.verdict == "worse" for c in changes)
    return ("improvement" if improved and not worse else "no improvement"), changes


def utility(before: Scores, after: Scores, budgets: Any) -> float:
    """Search ranking: the sum of metric changes in units of their bands; -inf if any metric
    is worse beyond its band or an image turned invalid."""
    _, changes = decide(before, after, budgets)
    if any(c.verdict == "worse" for c in changes):
        return -math.inf
    return float(sum(c.delta / c.band if c.band > 0 else c.delta for c in changes
                     if c.delta is not None and c.metric != "invalid_images"))


# --------------------------------------------------------------------------- generation


class _Drawer:
    """Draws the target's images (adapter(s) attached) and the base's (adapters disabled)."""

    def __init__(self, family: Any, pipe: Any, target: Target, cfg: SearchConfig) -> None:
        self.family, self.pipe, self.target, self.cfg = family, pipe, target, cfg
        names = []
        for i, (_style, folder) in enumerate(sorted(target.adapters.items())):
            name = f"neg_{i}"
            pipe.load_lora_weights(str(folder), adapter_name=name)
            names.append(name)
        self.names = names
        self.weights = [target.weights[s] for s, _ in sorted(target.adapters.items())]
        self.count = 0

    def prompts_for(self, prompts: Sequence[str]) -> list[str]:
        if self.target.kind == "style":  # an adapter is prompted like its captions (validation)
            return [self.cfg.adapter_prompt.format(prompt=p, style=self.target.name) for p in prompts]
        return list(prompts)

    def pairs(self, prompts: Sequence[str]) -> tuple[list[str], list[int]]:
        ps = [p for p in prompts for _ in self.cfg.seeds]
        return ps, [int(s) for _ in prompts for s in self.cfg.seeds]

    def draw(self, prompts: Sequence[str], negative: str) -> list[Image.Image]:
        self.pipe.enable_lora()
        self.pipe.set_adapters(self.names, adapter_weights=self.weights)
        ps, seeds = self.pairs(self.prompts_for(prompts))
        self.count += len(ps)
        return self.family.generate(self.pipe, ps, seeds, self.cfg.steps, self.cfg.guidance_scale,
                                    negative_prompts=[negative] * len(ps))

    def draw_base(self, prompts: Sequence[str]) -> list[Image.Image]:
        self.pipe.disable_lora()
        try:
            ps, seeds = self.pairs(prompts)
            self.count += len(ps)
            return self.family.generate(self.pipe, ps, seeds, self.cfg.steps, self.cfg.guidance_scale)
        finally:
            self.pipe.enable_lora()


# --------------------------------------------------------------------------- the search


@dataclass
class Candidate:
    negative_prompt: str
    source: str  # vocabulary | failure_mode | combination | empty
    search: Scores
    utility: float


@dataclass
class NegativesReport:
    target: Target
    verdict: str
    best: str | None  # the best search candidate (evaluated on held-out prompts), "" if none
    search_prompts: list[str]
    held_out_prompts: list[str]
    seeds: list[int]
    candidates: list[Candidate]
    held_out: dict[str, Scores]  # "empty" and "best"
    changes: list[MetricChange]
    failure_modes: dict[str, float]
    config: SearchConfig
    images: dict[str, list[Image.Image]] = field(default_factory=dict)  # held-out: "empty", "best"
    seconds: float = 0.0
    generated_images: int = 0

    def improvement(self) -> dict[str, float]:
        """Held-out deltas of the metrics that improved beyond their band."""
        return {c.metric: round(float(c.delta), 6) for c in self.changes if c.verdict == "better" and c.delta is not None}

    def to_dict(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        cfg["seeds"] = list(self.config.seeds)
        return {
            "target": {"kind": self.target.kind, "name": self.target.name, "key": self.target.key,
                       "weights": self.target.weights, "adapters": {k: str(v) for k, v in self.target.adapters.items()}},
            "verdict": self.verdict,
            "negative_prompt": self.best if self.verdict == "improvement" else None,
            "best_candidate": self.best,
            "improvement": self.improvement(),
            "held_out": {k: v.to_dict() for k, v in self.held_out.items()},
            "changes": [asdict(c) for c in self.changes],
            "search_prompts": self.search_prompts,
            "held_out_prompts": self.held_out_prompts,
            "seeds": self.seeds,
            "failure_modes": {k: round(v, 6) for k, v in self.failure_modes.items()},
            "candidates": [
                {"negative_prompt": c.negative_prompt, "source": c.source,
                 "utility": None if not math.isfinite(c.utility) else round(c.utility, 4), "search": c.search.to_dict()}
                for c in self.candidates
            ],
            "config": cfg,
            "seconds": round(self.seconds, 2),
            "generated_images": self.generated_images,
        }


def optimize(
    family: Any,
    pipe: Any,
    target: Target,
    data_dir: str | Path,
    prompts: Sequence[str],
    budgets: Any,
    cfg: SearchConfig = SearchConfig(),
    *,
    vocabulary: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> NegativesReport:
    """Search a negative prompt for `target` on a loaded base `pipe` (see the module doc).

    `vocabulary` None: :data:`DEFAULT_VOCABULARY`; the failure-mode words are always added.
    The pipe's LoRA adapters are loaded here and left attached (load a fresh pipe per call).
    """
    import time

    t0 = time.perf_counter()
    say = progress or (lambda _m: None)
    missing = [str(p) for p in target.adapters.values() if not (Path(p) / "pytorch_lora_weights.safetensors").is_file()]
    if missing:
        raise NegativesInputError(f"adapter weights not found in {missing}: train the style first (`dvc repro train`)")
    if not cfg.seeds:
        raise NegativesInputError("give at least one seed")
    search_prompts, held_prompts = split_prompts(prompts)
    refs = load_references(data_dir, sorted(target.weights))
    drawer = _Drawer(family, pipe, target, cfg)

    say("base model (the style gain's reference)")
    base_search = _distance(metrics.features(drawer.draw_base(search_prompts)), target, refs)
    base_held = _distance(metrics.features(drawer.draw_base(held_prompts)), target, refs)
    search_ps = drawer.pairs(drawer.prompts_for(search_prompts))[0]
    held_ps = drawer.pairs(drawer.prompts_for(held_prompts))[0]

    def on_search(negative: str) -> Scores:
        return score(drawer.draw(search_prompts, negative), search_ps, target, refs, base_search, cfg.failure_features)

    say("empty negative")
    empty = on_search("")
    failure_modes = dict(empty.residual)
    vocab = list(DEFAULT_VOCABULARY if vocabulary is None else vocabulary)
    terms: list[tuple[str, str]] = [(t, "failure_mode") for t in failure_terms(failure_modes)]
    terms += [(t, "vocabulary") for t in vocab if t not in {x for x, _ in terms}]
    candidates: list[Candidate] = []
    for term, source in terms[: max(1, cfg.max_candidates)]:
        say(f"single: {term!r}")
        s = on_search(term)
        candidates.append(Candidate(term, source, s, utility(empty, s, budgets)))
    singles = sorted(candidates, key=lambda c: -c.utility)
    # Greedy combination of the best few singles while it helps (within the budget).
    pool = [c for c in singles[: cfg.combine_top] if math.isfinite(c.utility) and c.utility > 0]
    if pool:
        current, parts = pool[0], [pool[0].negative_prompt]
        for nxt in pool[1:]:
            if len(parts) >= cfg.max_terms:
                break
            trial = ", ".join([*parts, nxt.negative_prompt])
            say(f"combination: {trial!r}")
            s = on_search(trial)
            cand = Candidate(trial, "combination", s, utility(empty, s, budgets))
            candidates.append(cand)
            if cand.utility > current.utility:
                current, parts = cand, [*parts, nxt.negative_prompt]
    finite = [c for c in candidates if math.isfinite(c.utility)]
    best = max(finite, key=lambda c: c.utility) if finite else None

    say("held-out prompts")
    held_images = {"empty": drawer.draw(held_prompts, "")}
    held = {"empty": score(held_images["empty"], held_ps, target, refs, base_held, cfg.failure_features)}
    if best is not None and best.utility > 0:
        held_images["best"] = drawer.draw(held_prompts, best.negative_prompt)
        held["best"] = score(held_images["best"], held_ps, target, refs, base_held, cfg.failure_features)
        verdict, changes = decide(held["empty"], held["best"], budgets)
    else:  # nothing helped even on the search prompts
        verdict, changes = "no improvement", []
    log.info("negatives for %s: %s (best on search prompts: %r)", target.key, verdict, best.negative_prompt if best else None)
    return NegativesReport(
        target=target, verdict=verdict, best=best.negative_prompt if best is not None and best.utility > 0 else None,
        search_prompts=search_prompts, held_out_prompts=held_prompts, seeds=[int(s) for s in cfg.seeds],
        candidates=[Candidate("", "empty", empty, 0.0), *candidates], held_out=held, changes=changes,
        failure_modes=failure_modes, config=cfg, images=held_images, seconds=time.perf_counter() - t0,
        generated_images=drawer.count,
    )


# --------------------------------------------------------------------------- report


def _fmt(x: Any) -> str:
    if x is None:
        return "not measured"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def report_markdown(report: NegativesReport) -> str:
    d = report.to_dict()
    lines = [
        f"# Negative prompt for {report.target.key}",
        "",
        f"**Verdict: {report.verdict}.** "
        + (f"Winner: `{report.best}` (saved as the default only by `save_default_negative`)."
           if report.verdict == "improvement" else
           "Nothing is saved as a default: no candidate improved a metric on the held-out prompts "
           "without making another worse beyond the gate's noise band."),
        "",
        f"Held-out prompts ({len(report.held_out_prompts)}) x seeds {report.seeds}; "
        f"{report.config.steps} steps, guidance {report.config.guidance_scale:g}; "
        f"{len(report.candidates) - 1} candidates searched on {len(report.search_prompts)} other prompts.",
        "",
    ]
    if "best" in report.held_out:
        e, b = report.held_out["empty"], report.held_out["best"]
        lines += [f"| metric (held-out) | empty negative | `{report.best}` | change | noise band | verdict |",
                  "|---|---|---|---|---|---|"]
        rows = {c.metric: c for c in report.changes}
        for name, be, af in (("style distance (lower is better)", e.style_distance, b.style_distance),):
            lines.append(f"| {name} | {be:.4f} | {af:.4f} | {af - be:+.4f} | | |")
        for metric in ("style_gain", "adherence", "invalid_images"):
            c = rows[metric]
            delta = "" if c.delta is None else f"{c.delta:+.4f}"
            band = "" if c.verdict == "not_measured" else f"±{c.band:.4f}"
            lines.append(f"| {metric} | {_fmt(c.before)} | {_fmt(c.after)} | {delta} | {band} | {c.verdict} |")
    else:
        e = report.held_out["empty"]
        lines += ["| metric (held-out) | empty negative |", "|---|---|",
                  f"| style distance | {e.style_distance:.4f} |", f"| style_gain | {e.style_gain:.4f} |",
                  f"| adherence | {_fmt(e.adherence)} |", f"| invalid_images | {e.invalid_images} |"]
    lines += ["", "## Failure modes of the empty negative (search prompts)", "",
              "| feature | generated minus references |", "|---|---|"]
    lines += [f"| {k} | {v:+.4f} |" for k, v in report.failure_modes.items()]
    lines += ["", "## Candidates (search prompts)", "",
              "| negative prompt | source | style distance | adherence | invalid | utility |", "|---|---|---|---|---|---|"]
    for c in d["candidates"]:
        s = c["search"]
        adh = s["adherence"] if not isinstance(s["adherence"], dict) else None
        util = "worse beyond a band" if c["utility"] is None else f"{c['utility']:.3f}"
        lines.append(f"| `{c['negative_prompt'] or '(empty)'}` | {c['source']} | {s['style_distance']:.4f} | "
                     f"{_fmt(adh)} | {s['invalid_images']} | {util} |")
    lines += ["", "Utility: the sum of metric changes in units of their noise bands; "
              "a candidate that made any metric worse beyond its band is never chosen.", "", "![grid](grid.png)", ""]
    return "\n".join(lines)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def make_grid(report: NegativesReport, cell: int = 96) -> Image.Image:
    """Rows: held-out prompt x seed; columns: empty negative, best candidate (if any)."""
    cols = [k for k in ("empty", "best") if k in report.images]
    labels = {"empty": "empty negative", "best": f"negative: {report.best}"}
    label_w, header, pad = 260, 30, 4
    rows = [(p, s) for p in report.held_out_prompts for s in report.seeds]
    grid = Image.new("RGB", (label_w + len(cols) * (cell + pad) + pad, header + len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    small = _font(10)
    for c, key in enumerate(cols):
        draw.text((label_w + pad + c * (cell + pad), 8), labels[key][:22], fill="black", font=small)
    for r, (prompt, seed) in enumerate(rows):
        y = header + pad + r * (cell + pad)
        draw.text((6, y + 4), prompt[:40], fill="black", font=small)
        draw.text((6, y + 20), f"seed {seed}", fill="dimgray", font=small)
        for c, key in enumerate(cols):
            im = report.images[key][r].convert("RGB")
            resample = Image.Resampling.NEAREST if im.width <= cell else Image.Resampling.LANCZOS
            grid.paste(im.resize((cell, cell), resample), (label_w + pad + c * (cell + pad), y))
    return grid


def write_report(report: NegativesReport, out_dir: str | Path) -> Path:
    """``negatives.json``, ``negatives.md`` and ``grid.png`` in `out_dir`, replaced in one rename."""
    import json

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "negatives.json").write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
        (tmp / "negatives.md").write_text(report_markdown(report))
        make_grid(report).save(tmp / "grid.png")
    return out_dir


# --------------------------------------------------------------------------- the default store


def store_path(root: str | Path) -> Path:
    return Path(root) / "studio" / "negatives.yaml"


# The parsed store by path, with the (mtime, size) it was read at: the server looks a default
# up on every request, and the file changes only when `stunning negatives optimize` saves one.
_STORE_CACHE: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}


def _read_store(root: str | Path) -> dict[str, Any]:
    import copy

    import yaml

    path = store_path(root)
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {}
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _STORE_CACHE.get(path)
    if cached is not None and cached[0] == stamp:
        return copy.deepcopy(cached[1])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise NegativesInputError(f"{path}: cannot read the saved negative prompts ({exc}); fix or delete the file") from None
    if not isinstance(data, dict):
        raise NegativesInputError(f"{path}: expected a mapping of targets (style:<name>, blend:<name>); fix or delete the file")
    _STORE_CACHE[path] = (stamp, data)
    return copy.deepcopy(data)


def save_default_negative(root: str | Path, target: str, negative_prompt: str, evidence: Mapping[str, Any]) -> Path:
    """Store `negative_prompt` as the default of `target` (``style:noir``, ``blend:half-half``)
    in ``<root>/studio/negatives.yaml`` with its evidence (measured improvement...) and date."""
    import yaml

    if not (target.startswith("style:") or target.startswith("blend:")) or len(target.split(":", 1)[1]) == 0:
        raise ValueError(f"target {target!r}: expected 'style:<name>' or 'blend:<name>'")
    data = _read_store(root)
    data[target] = {
        "negative_prompt": str(negative_prompt),
        "saved": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "evidence": _plain(evidence),
    }
    path = store_path(root)
    atomic_write_text(path, "# Default negative prompts per style/blend (stunning negatives optimize).\n"
                      + yaml.safe_dump(data, sort_keys=True, allow_unicode=True))
    return path


def _plain(obj: Any) -> Any:
    """YAML-safe plain data (numpy numbers, paths and tuples converted)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def default_negative(
    root: str | Path, style: str | None = None, blend: str | None = None, weights: Mapping[str, float] | None = None,
) -> str | None:
    """The saved default negative prompt of a style/blend, or None (nothing saved; or not exactly
    one target: the base model, or a request the model refuses for naming several).

    Empty names count as absent, as the model reads them. A request's explicit
    ``negative_prompt`` (``""`` included) takes precedence over this.
    """
    given = {k: v for k, v in (("style", style), ("blend", blend), ("weights", weights)) if v}
    if len(given) != 1:
        return None
    entry = _read_store(root).get(target_key(**given))
    if isinstance(entry, Mapping) and isinstance(entry.get("negative_prompt"), str):
        return entry["negative_prompt"]
    return None


# --------------------------------------------------------------------------- entry point


def parse_weights(text: str) -> dict[str, float]:
    """``"impressionist=0.5,noir=0.5"`` -> ``{"impressionist": 0.5, "noir": 0.5}``."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, eq, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            eq = ""
        if not eq or not name.strip():
            raise NegativesInputError(f"blend weights {text!r}: write style=weight pairs, e.g. impressionist=0.5,noir=0.5")
    if not out:
        raise NegativesInputError("blend weights: none given; write style=weight pairs, e.g. impressionist=0.5,noir=0.5")
    return out


def run(
    params: Any,
    *,
    prompts: Sequence[str],
    out_dir: str | Path,
    style: str | None = None,
    blend: str | None = None,
    weights: Mapping[str, float] | None = None,
    seeds: Sequence[int] = (0, 1),
    vocabulary_file: str | Path | None = None,
    base: str | Path | None = None,
    adapters_dir: str | Path = "models/adapters",
    data_dir: str | Path = "data/curated",
    steps: int | None = None,
    max_candidates: int = 12,
    default_vocabulary: bool = True,
    failure_features: int = 3,
    save: bool = True,
    root: str | Path = ".",
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[NegativesReport, Path | None]:
    """What ``stunning negatives optimize`` does: search, write the report to `out_dir`, and
    (when the verdict is an improvement and `save`) store the winner as the target's default.

    Candidates: :data:`DEFAULT_VOCABULARY` (unless `default_vocabulary` is false), the terms of
    `vocabulary_file`, and the failure-mode words of the top `failure_features` residual features.

    A named `blend` takes its weights from ``params.merge.blends``; `weights` is an unnamed
    blend. Returns the report and the store path written (None when nothing was saved).
    """
    import torch

    from stunning.device import default_dtype, select_device
    from stunning.families import get_family

    if sum(x is not None for x in (style, blend, weights)) != 1:
        raise NegativesInputError("give exactly one of --style, --blend or --blend-weights")
    if style is not None:
        target = Target.style(style, Path(adapters_dir) / style)
    elif blend is not None:
        named = {b.name: b for b in params.merge.blends}
        if blend not in named:
            raise NegativesInputError(f"blend {blend!r} is not in params.yaml merge.blends ({sorted(named)}); "
                                      "or give --blend-weights")
        target = Target.blend(dict(named[blend].weights), adapters_dir, name=blend)
    else:
        target = Target.blend(dict(weights or {}), adapters_dir)
    vocabulary = list(DEFAULT_VOCABULARY) if default_vocabulary else []
    if vocabulary_file is not None:
        vocabulary += [t for t in read_vocabulary(vocabulary_file) if t not in vocabulary]
    v = params.validate_
    cfg = SearchConfig(seeds=tuple(int(s) for s in seeds), steps=int(steps or v.steps), guidance_scale=float(v.guidance_scale),
                       max_candidates=max_candidates, adapter_prompt=v.adapter_prompt, failure_features=failure_features)
    family = get_family(params.base.family)
    dev = select_device(device)
    with torch.no_grad():
        pipe = family.load_pipeline(Path(base or params.base.path), dev, default_dtype(dev))
        report = optimize(family, pipe, target, data_dir, prompts, params.budgets, cfg, vocabulary=vocabulary,
                          progress=progress)
    write_report(report, out_dir)
    saved = None
    if save and report.verdict == "improvement" and report.best:
        saved = save_default_negative(root, target.key, report.best, {
            "improvement": report.improvement(),
            "held_out": {k: s.to_dict() for k, s in report.held_out.items()},
            "held_out_prompts": report.held_out_prompts, "seeds": report.seeds, "steps": cfg.steps,
            "report": str(Path(out_dir) / "negatives.json"),
        })
    return report, saved
