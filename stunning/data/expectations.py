"""The data gate: a Great Expectations suite over the curated manifest.

Curation checks its own filters, but the gate states, in one declarative place, what the
training stage is allowed to assume about ``data/curated/manifest.csv``: every column is
there, ids are unique, styles and splits are known, images are square at
``data.resolution``, captions are long enough, nothing blurry slipped through, and every
style has enough training images. The result is a readable report
(``reports/data_validation.json``) with each expectation, whether it held and what was
observed.

Great Expectations takes seconds to import, so it is imported inside
:func:`validate_manifest` only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stunning.config import CurateConfig, DataConfig
from stunning.io import write_json

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS: list[str] = [
    "id", "style", "split", "path", "caption", "width", "height", "phash", "blur", "caption_words",
]
_MAX_EXAMPLES = 10


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation: a human name, the GX type and arguments, the verdict, what was seen."""

    name: str
    expectation: str
    kwargs: dict[str, Any]
    success: bool
    observed: dict[str, Any]

    def describe(self) -> str:
        """A one-line account of what was observed, for failure messages."""
        obs = self.observed
        if obs.get("error"):
            return f"could not be evaluated: {obs['error']}"
        if obs.get("unexpected_count"):
            text = f"{obs['unexpected_count']} of {obs.get('element_count', '?')} rows violate it"
            if obs.get("unexpected_ids"):
                text += f", ids {obs['unexpected_ids']}"
            if obs.get("unexpected_values"):
                text += f", values {obs['unexpected_values']}"
            return text
        if "observed_value" in obs:
            return f"observed {obs['observed_value']}"
        return "failed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "expectation": self.expectation,
            "kwargs": self.kwargs,
            "success": self.success,
            "observed": self.observed,
        }


@dataclass
class ValidationReport:
    """All outcomes of the suite; ``success`` only if every expectation held."""

    outcomes: list[ExpectationOutcome] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return all(o.success for o in self.outcomes)

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def failure_text(self) -> str:
        if self.success:
            return f"data validation passed ({len(self.outcomes)} expectations)"
        lines = [f"data validation failed: {len(self.failures)} of {len(self.outcomes)} expectations not met:"]
        lines += [f"  - {o.name}: {o.describe()}" for o in self.failures]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "evaluated": len(self.outcomes),
            "failed": len(self.failures),
            "expectations": [o.to_dict() for o in self.outcomes],
        }


def write_validation_report(report: ValidationReport, path: Path) -> None:
    """Write ``reports/data_validation.json`` atomically."""
    write_json(Path(path), report.to_dict())


def _train_counts(manifest: pd.DataFrame, styles: list[str]) -> pd.DataFrame:
    """One row, one column per style: the number of training images of that style."""
    import pandas as pd

    counts = {s: 0 for s in styles}
    if {"style", "split"} <= set(manifest.columns):
        train = manifest[manifest["split"] == "train"]
        for style, n in train["style"].value_counts().items():
            if style in counts:
                counts[str(style)] = int(n)
    return pd.DataFrame([counts], columns=styles)


def _size_expectations(E: Any, data_cfg: DataConfig) -> list[tuple[str, Any]]:
    """Square images of data.resolution, or with data.buckets one of its buckets' sizes."""
    res = data_cfg.resolution
    if not data_cfg.buckets:
        return [
            (f"width == data.resolution ({res})", E.ExpectColumnValuesToBeBetween(column="width", min_value=res, max_value=res)),
            (f"height == data.resolution ({res})", E.ExpectColumnValuesToBeBetween(column="height", min_value=res, max_value=res)),
        ]
    from stunning.data.images import bucket_sizes

    buckets = bucket_sizes(res, data_cfg.bucket_step, data_cfg.bucket_max_ratio)
    widths, heights = sorted({w for w, _ in buckets}), sorted({h for _, h in buckets})
    return [
        (f"width is a bucket width of data.resolution {res} (step {data_cfg.bucket_step})",
         E.ExpectColumnValuesToBeInSet(column="width", value_set=widths)),
        (f"height is a bucket height of data.resolution {res} (step {data_cfg.bucket_step})",
         E.ExpectColumnValuesToBeInSet(column="height", value_set=heights)),
    ]


def _manifest_expectations(gx: Any, data_cfg: DataConfig, cfg: CurateConfig) -> list[tuple[str, Any]]:
    E = gx.expectations
    named: list[tuple[str, Any]] = [(f"column '{c}' exists", E.ExpectColumnToExist(column=c)) for c in REQUIRED_COLUMNS]
    named += [
        ("manifest is not empty", E.ExpectTableRowCountToBeBetween(min_value=1)),
        ("id is never empty", E.ExpectColumnValuesToNotBeNull(column="id")),
        ("id is unique", E.ExpectColumnValuesToBeUnique(column="id")),
        (f"style is one of data.styles {list(data_cfg.styles)}",
         E.ExpectColumnValuesToBeInSet(column="style", value_set=list(data_cfg.styles))),
        ("split is train or val", E.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val"])),
        *_size_expectations(E, data_cfg),
        ("caption is present", E.ExpectColumnValuesToNotBeNull(column="caption")),
        (f"caption has >= curate.min_caption_words ({cfg.min_caption_words}) words",
         E.ExpectColumnValuesToBeBetween(column="caption_words", min_value=cfg.min_caption_words)),
        (f"blur score >= curate.blur_threshold ({cfg.blur_threshold})",
         E.ExpectColumnValuesToBeBetween(column="blur", min_value=cfg.blur_threshold)),
    ]
    return named


def _count_expectations(gx: Any, data_cfg: DataConfig, cfg: CurateConfig) -> list[tuple[str, Any]]:
    n = cfg.min_images_per_style
    return [
        (f"style '{s}' has >= curate.min_images_per_style ({n}) train images",
         gx.expectations.ExpectColumnMinToBeBetween(column=s, min_value=n))
        for s in data_cfg.styles
    ]


def _run_suite(
    gx: Any, context: Any, name: str, frame: pd.DataFrame, named: list[tuple[str, Any]]
) -> list[ExpectationOutcome]:
    asset = context.data_sources.add_pandas(f"{name}_source").add_dataframe_asset(name)
    batch_definition = asset.add_batch_definition_whole_dataframe(f"{name}_whole")
    suite = gx.ExpectationSuite(name=f"{name}_suite")
    for label, expectation in named:
        expectation.meta = {"name": label}
        suite.add_expectation(expectation)
    suite = context.suites.add(suite)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{name}_validation", data=batch_definition, suite=suite)
    )
    results = definition.run(batch_parameters={"dataframe": frame}, result_format="SUMMARY")
    return [_outcome(r, frame) for r in results.results]


def _outcome(result: Any, frame: pd.DataFrame) -> ExpectationOutcome:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    raw = result.to_json_dict().get("result") or {}
    observed: dict[str, Any] = {}
    for key in ("observed_value", "element_count", "unexpected_count", "unexpected_percent", "missing_count"):
        if key in raw and raw[key] is not None:
            observed[key] = raw[key]
    if raw.get("partial_unexpected_list"):
        observed["unexpected_values"] = raw["partial_unexpected_list"][:_MAX_EXAMPLES]
    index = raw.get("partial_unexpected_index_list") or []
    if index and "id" in frame.columns:
        observed["unexpected_ids"] = [str(frame["id"].iloc[int(i)]) for i in index[:_MAX_EXAMPLES]]
    errors = _exception_messages(result.exception_info)
    if errors:
        observed["error"] = "; ".join(errors)
    name = (config.meta or {}).get("name") or config.type
    return ExpectationOutcome(name, config.type, kwargs, bool(result.success), observed)


def _exception_messages(info: Any) -> list[str]:
    """Messages from GX ``exception_info``: one dict, or a dict of them keyed by metric."""
    if not isinstance(info, dict):
        return []
    if "raised_exception" in info:
        if not info.get("raised_exception"):
            return []
        return [str(info.get("exception_message") or "exception while evaluating")]
    messages: list[str] = []
    for value in info.values():
        for msg in _exception_messages(value):
            if msg not in messages:
                messages.append(msg)
    return messages


def validate_manifest(manifest: pd.DataFrame, data_cfg: DataConfig, cfg: CurateConfig) -> ValidationReport:
    """Run the suite on a curated manifest DataFrame; never raises for bad data, reports it."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    project = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,  # offline and private: no usage statistics
        progress_bars=ProgressBarsConfig(globally=False),  # keep stage logs readable
    )
    context = gx.get_context(mode="ephemeral", project_config=project)
    manifest = manifest.reset_index(drop=True)
    outcomes = _run_suite(gx, context, "manifest", manifest, _manifest_expectations(gx, data_cfg, cfg))
    counts = _train_counts(manifest, list(data_cfg.styles))
    outcomes += _run_suite(gx, context, "train_counts", counts, _count_expectations(gx, data_cfg, cfg))
    report = ValidationReport(outcomes)
    logger.info("data validation: %d/%d expectations met", len(outcomes) - len(report.failures), len(outcomes))
    return report
