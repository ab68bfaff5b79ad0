"""On the shipped micro model, an adapter trained with an absurd learning rate is refused.

Measured through the same library calls as the DAG's train and validate stages, on the
embedded sample set. (That the default adapters pass the gate — style distance halved,
adherence within 10 points — is asserted on the real `dvc repro` in tests/test_e2e.py.)
"""

from __future__ import annotations

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
    from stunning.training.lora import train_style
    from stunning.validation import validate

    fam = get_family(params.base.family)
    for style in params.data.styles:
        train_style(base, fam, curated, style, params.train, out / "adapters", None, None, "cpu",
                    sample_seeds=(), progress=False)
    result = validate(params, base, out / "adapters", None, curated, out / "validation", device="cpu")
    return result.to_dict()


@pytest.mark.slow
def test_an_adapter_trained_with_an_absurd_learning_rate_fails_the_gate(micro_base, curated, tmp_path, one_torch_thread):
    params = Params.model_validate({
        "base": {"path": str(micro_base)},
        "train": {"learning_rate": 5.0, "steps": 40},
        "validate": {"seeds": [0, 1]},
    })
    v = train_and_validate(params, micro_base, curated, tmp_path)
    gate = evaluate(v, None, params.budgets)
    failed = {c.name for c in gate.checks if not c.passed} - {"quantized_size_ratio", "quantization_mse"}
    assert not gate.passed and failed, gate.reasons
    assert failed & {"style_gain/impressionist", "style_gain/noir", "adherence_drop/impressionist", "valid_images"}
