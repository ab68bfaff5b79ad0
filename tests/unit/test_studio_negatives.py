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
    """A small noir reference set rendered by the embedded world, and a noir adapter trained on
    it for a few seconds (micro model, tiny train settings)."""
    from stunning.data.sample import draw_scene, render
    from stunning.families import get_family
    from stunning.training.trainer import train_style

    rng = np.random.default_rng(0)
    items = []
    for i in range(12):
        scene = draw_scene(rng, i)
        items.append(CuratedItem(f"noir-{i}", "noir", "val" if i < 3 else "train", render(scene, "noir", rng).resize((32, 32)),
                                 scene.caption("noir")))
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
