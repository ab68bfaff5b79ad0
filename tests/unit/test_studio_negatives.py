"""The negative-prompt optimizer (stunning/studio/negatives.py): its decision, its store, and
an honest "no improvement" on the shipped micro model with a quickly trained noir adapter."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from stunning.config import BudgetsConfig, Params
from stunning.studio import negatives as N
from tests.factories import CuratedItem, tiny_train_config, write_curated

PROMPTS = [
    "a red dress on a white background",
    "a blue hat on a grey background",
    "a black bag on a beige background",
    "a green dress on a white background",
]


def scores(gain: float, adherence: float | None = 0.9, invalid: int = 0, distance: float = 0.1) -> N.Scores:
    return N.Scores(distance, gain, adherence, "" if adherence is not None else "not in the grammar", invalid, 8)


# --------------------------------------------------------------------------- the decision


def test_a_style_gain_beyond_the_band_with_adherence_kept_is_an_improvement():
    verdict, changes = N.decide(scores(0.40), scores(0.45, adherence=0.88), BudgetsConfig())
    assert verdict == "improvement"
    by = {c.metric: c for c in changes}
    assert by["style_gain"].verdict == "better" and by["style_gain"].band == pytest.approx(0.03)
    assert by["adherence"].verdict == "same"  # -0.02 is inside adherence_drop's 0.05 floor


def test_a_gain_within_the_noise_band_is_no_improvement():
    assert N.decide(scores(0.40), scores(0.42), BudgetsConfig())[0] == "no improvement"


def test_a_gain_paid_for_with_adherence_beyond_the_band_is_no_improvement():
    verdict, changes = N.decide(scores(0.40, 0.9), scores(0.60, 0.8), BudgetsConfig())
    assert verdict == "no improvement"
    assert {c.metric: c.verdict for c in changes}["adherence"] == "worse"


def test_an_extra_invalid_image_blocks_an_otherwise_better_candidate():
    verdict, changes = N.decide(scores(0.40), scores(0.60, invalid=1), BudgetsConfig())
    assert verdict == "no improvement"
    assert {c.metric: c.verdict for c in changes}["invalid_images"] == "worse"


def test_unmeasurable_adherence_stays_not_measured_and_neither_helps_nor_blocks():
    verdict, changes = N.decide(scores(0.40, None), scores(0.50, None), BudgetsConfig())
    assert verdict == "improvement"
    adh = {c.metric: c for c in changes}["adherence"]
    assert adh.verdict == "not_measured" and adh.delta is None
    assert N.utility(scores(0.4, None), scores(0.3, None), BudgetsConfig()) == -math.inf


def test_bands_follow_the_budgets():
    wide = BudgetsConfig(noise_floor={"style_gain": 0.5, "adherence_drop": 0.05})
    assert N.decide(scores(0.40), scores(0.60), wide)[0] == "no improvement"


def test_failure_modes_map_the_direction_of_a_residual_to_words():
    words = N.failure_terms({"saturation_std": +0.2, "luma_std": -0.1, "grain": -0.05})
    assert words[:2] == ["colour cast", "sepia"]
    assert "low contrast" in words and "blurry" in words
    assert "harsh contrast" not in words and "noise" not in words  # the opposite direction


def test_prompts_split_alternately_and_weights_parse():
    assert N.split_prompts(PROMPTS) == (PROMPTS[0::2], PROMPTS[1::2])
    with pytest.raises(N.NegativesInputError, match="at least 2"):
        N.split_prompts(["only one"])
    assert N.parse_weights("noir=0.25, impressionist=0.75") == {"noir": 0.25, "impressionist": 0.75}
    with pytest.raises(N.NegativesInputError, match="style=weight"):
        N.parse_weights("noir:0.5")


# --------------------------------------------------------------------------- the store


def test_a_saved_default_is_read_back_per_target_with_its_evidence(tmp_path):
    assert N.default_negative(tmp_path, style="noir") is None  # nothing saved yet
    path = N.save_default_negative(tmp_path, "style:noir", "sepia", {"improvement": {"style_gain": np.float64(0.05)}})
    N.save_default_negative(tmp_path, N.target_key(weights={"noir": 0.5, "impressionist": 0.5}), "blurry", {})
    N.save_default_negative(tmp_path, "blend:half-half", "", {})  # "" is a valid saved choice: none
    assert path == tmp_path / "studio" / "negatives.yaml"
    stored = yaml.safe_load(path.read_text())
    assert stored["style:noir"]["evidence"] == {"improvement": {"style_gain": 0.05}}
    assert stored["style:noir"]["saved"][:4].isdigit()
    assert N.default_negative(tmp_path, style="noir") == "sepia"
    assert N.default_negative(tmp_path, weights={"impressionist": 0.5, "noir": 0.5}) == "blurry"
    assert N.default_negative(tmp_path, blend="half-half") == ""
    assert N.default_negative(tmp_path, style="impressionist") is None
    assert N.default_negative(tmp_path) is None  # the base model: no target, no default
    # Empty names count as absent, as the model reads them; two targets: the model refuses, no default.
    assert N.default_negative(tmp_path, style="", weights={"impressionist": 0.5, "noir": 0.5}) == "blurry"
    assert N.default_negative(tmp_path, style="noir", blend="half-half") is None
    assert not list((tmp_path / "studio").glob(".*tmp"))  # written atomically


def test_a_damaged_store_is_a_user_error_naming_the_file(tmp_path):
    (tmp_path / "studio").mkdir()
    (tmp_path / "studio" / "negatives.yaml").write_text("- not a mapping\n")
    with pytest.raises(N.NegativesInputError, match="negatives.yaml"):
        N.default_negative(tmp_path, style="noir")
    with pytest.raises(ValueError, match="style:<name>"):
        N.save_default_negative(tmp_path, "noir", "x", {})


# --------------------------------------------------------------------------- on the micro model


@pytest.fixture(scope="module")
def noir_world(tmp_path_factory, micro_base):
    """A small noir (and impressionist) reference set rendered by the embedded world, and a noir
    adapter trained on it for a few seconds (micro model, tiny train settings)."""
    from stunning.data.sample import draw_scene, render
    from stunning.families import get_family
    from stunning.training.trainer import train_style

    items = []
    for style in ("noir", "impressionist"):  # the same 12 scenes in both styles (impressionist: see below)
        rng = np.random.default_rng(0)
        for i in range(12):
            scene = draw_scene(rng, i)
            items.append(CuratedItem(f"{style}-{i}", style, "val" if i < 3 else "train",
                                     render(scene, style, rng).resize((32, 32)), scene.caption(style)))
    root = tmp_path_factory.mktemp("negatives")
    data = write_curated(root / "curated", items)
    train_style(micro_base, get_family("sd3"), data, "noir", tiny_train_config(steps=60), root / "adapters", None, None,
                "cpu", sample_seeds=(), progress=False)
    return root


def test_meaningless_terms_give_no_improvement_and_nothing_is_saved(noir_world, micro_base, one_torch_thread):
    params = Params.model_validate({"base": {"path": str(micro_base)}})
    vocab = noir_world / "vocab.txt"
    vocab.write_text("# tokens that mean nothing to the model\nqx zv\nvvkq\n")
    assert N.read_vocabulary(vocab) == ["qx zv", "vvkq"]
    out = noir_world / "report"
    # Only the meaningless terms (no default vocabulary, no failure-mode words), small budget.
    report, saved = N.run(
        params, prompts=PROMPTS, out_dir=out, style="noir", seeds=(0, 1), vocabulary_file=vocab,
        adapters_dir=noir_world / "adapters", data_dir=noir_world / "curated", steps=6, max_candidates=3,
        default_vocabulary=False, failure_features=0, root=noir_world, device="cpu",
    )
    assert report.verdict == "no improvement"
    body = json.loads((out / "negatives.json").read_text())
    assert body["verdict"] == "no improvement" and body["negative_prompt"] is None
    assert body["search_prompts"] == PROMPTS[0::2] and body["held_out_prompts"] == PROMPTS[1::2]
    assert [c["negative_prompt"] for c in body["candidates"]][:3] == ["", "qx zv", "vvkq"]
    # Every candidate drawn on the same fixed seeds; adherence is not measurable for noir.
    assert body["held_out"]["empty"]["adherence"]["measured"] is False
    assert body["held_out"]["empty"]["invalid_images"] == 0
    assert "no improvement" in (out / "negatives.md").read_text()
    assert (out / "grid.png").is_file()
    assert saved is None and not (noir_world / "studio").exists()
    assert N.default_negative(noir_world, style="noir") is None


@pytest.fixture(scope="module")
def impressionist_adapter(noir_world, micro_base):
    """An impressionist adapter trained on `noir_world`'s impressionist images (100 tiny steps:
    at 60 it is hardly closer to its references than the base model, nothing to improve on)."""
    from stunning.families import get_family
    from stunning.training.trainer import train_style

    train_style(micro_base, get_family("sd3"), noir_world / "curated", "impressionist", tiny_train_config(steps=100),
                noir_world / "adapters", None, None, "cpu", sample_seeds=(), progress=False)
    return noir_world / "adapters" / "impressionist"


# Twelve prompts of the embedded grammar: six to search on, six held out (alternately).
WORLD_PROMPTS = [
    "a red dress on a white background", "a blue hat on a grey background", "a black bag on a beige background",
    "a green dress on a white background", "a pink shirt on a beige background, on the right",
    "a pair of yellow trousers on a black background", "an orange bag on a white background, on the left",
    "a red hat on a grey background, on the right", "a purple shirt on a black background",
    "a white dress on a grey background, on the left", "a yellow hat on a beige background",
    "a blue bag on a black background, on the right",
]


@pytest.mark.slow  # trains an adapter (100 steps) and searches negatives on the micro model (~20 s)
def test_a_negative_found_on_search_prompts_improves_the_held_out_style_gain(
    noir_world, impressionist_adapter, micro_base, one_torch_thread, tmp_path,
):
    """The embedded world's impressionist adapter draws brighter pictures than its references
    (dark, tinted shadows); a negative steering away from that ("low contrast" or "bright") is
    found on six prompts and beats the gate's noise band on six *other* prompts, on three
    seeds, with adherence measured and within its band.

    Measured beforehand (all 12 prompts x 4 seeds, 6 steps): style gain "bright" +0.10 (each
    seed +0.10..+0.11), "low contrast" +0.07 (each seed +0.06..+0.09), adherence unchanged;
    the style_gain band is 0.03. ("overexposed" also gains style but costs 0.10 adherence.)"""
    params = Params.model_validate({"base": {"path": str(micro_base)}})
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("bright\nlow contrast\n")
    out = tmp_path / "report"
    report, saved = N.run(
        params, prompts=WORLD_PROMPTS, out_dir=out, style="impressionist", seeds=(0, 1, 2), vocabulary_file=vocab,
        adapters_dir=impressionist_adapter.parent, data_dir=noir_world / "curated", steps=6, max_candidates=2,
        default_vocabulary=False, failure_features=0, root=tmp_path, device="cpu",
    )
    assert report.verdict == "improvement", (out / "negatives.md").read_text()
    assert report.best in {"bright", "low contrast", "bright, low contrast", "low contrast, bright"}
    by = {c.metric: c for c in report.changes}
    assert by["style_gain"].verdict == "better" and by["style_gain"].delta > by["style_gain"].band == pytest.approx(0.03)
    assert by["adherence"].verdict == "same" and by["adherence"].before is not None  # measured, within its band
    assert by["invalid_images"].verdict == "same"
    assert set(report.held_out_prompts).isdisjoint(report.search_prompts)
    # Saved with its held-out evidence, and what the server/UI now use for the style.
    assert saved == N.store_path(tmp_path)
    assert N.default_negative(tmp_path, style="impressionist") == report.best
    evidence = yaml.safe_load(saved.read_text())["style:impressionist"]["evidence"]
    assert evidence["improvement"]["style_gain"] > 0.03 and evidence["seeds"] == [0, 1, 2]


def test_the_cli_refuses_two_targets_with_a_message(tmp_path):
    from pathlib import Path

    from typer.testing import CliRunner

    from stunning.cli import app

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    params = Path(__file__).resolve().parents[2] / "params.yaml"
    result = CliRunner().invoke(app, ["negatives", "optimize", "--style", "noir", "--blend", "half-half",
                                      "--prompts", str(prompts), "--params", str(params)])
    assert result.exit_code == 2
    assert "exactly one of --style, --blend or --blend-weights" in result.output
