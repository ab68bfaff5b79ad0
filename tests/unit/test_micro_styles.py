"""On the shipped micro model, an adapter trained with an absurd learning rate is refused.

With the divergence sentinel (stunning/training/divergence.py) such a run no longer ends
with NaN weights: it either fails with `TrainingDiverged` (no adapter is written, so nothing
can be merged, validated or promoted) or recovers at a halved learning rate, and then the
adapter it writes is finite and still refused by the gate. Either way an absurd learning
rate never produces a promoted adapter, which is what this module proves.

Measured through the same library calls as the DAG's train and validate stages, on the
embedded sample set. (That the default adapters pass the gate — style distance halved,
adherence within 10 points — is asserted on the real `dvc repro` in tests/test_e2e.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stunning.config import Params
from stunning.families import get_family
from stunning.gate import evaluate


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """The embedded sample set, ingested and curated exactly as the DAG does it."""
    from stunning.data.curate import curate
    from stunning.data.ingest import ingest
    from stunning.data.sample import generate_sample

    params = Params()
    root = tmp_path_factory.mktemp("data")
    generate_sample(root / "sample", params.data)
    ingest(root / "sample", root / "ingested", params.data)
    curate(root / "ingested", root / "curated", params.data, params.curate, validate=False)
    return root / "curated"


def train_and_validate(params: Params, base, curated, out):
    from stunning.training.trainer import train_style
    from stunning.validation import validate

    fam = get_family(params.base.family)
    for style in params.data.styles:
        train_style(base, fam, curated, style, params.train, out / "adapters", None, None, "cpu",
                    sample_seeds=(), progress=False)
    result = validate(params, base, out / "adapters", None, curated, out / "validation", device="cpu")
    return result.to_dict()


@pytest.mark.slow
def test_an_adapter_trained_with_an_absurd_learning_rate_fails_the_gate(micro_base, curated, tmp_path, one_torch_thread):
    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())  # the shipped settings
    raw["base"]["path"] = str(micro_base)
    raw["train"].update(learning_rate=5.0, steps=40)  # ...with an absurd learning rate
    raw["validate"]["seeds"] = [0, 1]
    params = Params.model_validate(raw)
    from stunning.training.divergence import TrainingDiverged

    try:
        v = train_and_validate(params, micro_base, curated, tmp_path)
    except TrainingDiverged as exc:
        # Refused before any adapter exists: nothing reaches the gate at all.
        assert "train.learning_rate" in str(exc)
        style = str(exc).split(":")[0]
        assert style in params.data.styles
        assert not (tmp_path / "adapters" / style / "pytorch_lora_weights.safetensors").exists()
        return
    gate = evaluate(v, None, params.budgets)
    failed = {c.name for c in gate.checks if not c.passed}
    assert not gate.passed, gate.reasons
    # Refused for what is broken, not just for a small gain: images move *away* from the
    # style and the impressionist adapter no longer follows its prompt.
    assert all(g < 0 for g in v["style_gain"].values()), v["style_gain"]
    assert "adherence_drop/impressionist" in failed and v["adherence_drop"]["impressionist"] > 0.5
