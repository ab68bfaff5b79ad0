"""The divergence sentinel: non-finite steps are rolled back and retried at a lower learning
rate, deterministically; past `train.max_divergence_retries` training fails with advice and
writes nothing. Tiny sd3 model on the CPU, real optimisation (no injected NaNs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stunning.training.divergence import TrainingDiverged
from stunning.training.trainer import train_style
from tests.factories import RecordingTracker, make_curated, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    return make_curated(tmp_path_factory.mktemp("curated"))


def _train(tiny_base, curated, out: Path, checkpoints: Path | None, **kw):
    cfg = tiny_train_config(**{"steps": 8, "batch_size": 2, "checkpoint_every": 2, **kw})
    tracker = RecordingTracker()
    summary = train_style(tiny_base, "sd3", curated, "noir", cfg, out, tracker, checkpoints, "cpu", sample_seeds=(),
                          progress=False)
    return summary, tracker


def test_an_absurd_learning_rate_fails_with_what_to_change_and_writes_no_adapter(tmp_path, tiny_base, curated):
    with pytest.raises(TrainingDiverged) as exc:
        _train(tiny_base, curated, tmp_path / "out", tmp_path / "ck", learning_rate=1e4, max_divergence_retries=2)
    msg = str(exc.value)
    # The rate that last diverged (1e4 halved twice) and a tenth of it as the suggestion.
    assert "learning rate 2500" in msg and "train.learning_rate (e.g. to 250)" in msg, msg
    assert "after 2 retries" in msg and "mixed_precision" in msg.lower().replace(" ", "_")
    assert not (tmp_path / "out" / "noir").exists()


def test_a_diverging_run_recovers_at_a_lower_rate_deterministically(tmp_path, tiny_base, curated):
    lr = 16.0  # diverges on the tiny model; a few halvings later it trains
    a, tracker = _train(tiny_base, curated, tmp_path / "a", tmp_path / "ck", learning_rate=lr, max_divergence_retries=8)
    assert a["divergence_retries"] >= 1 and a["learning_rate_final"] == lr * 0.5 ** a["divergence_retries"]
    assert len(a["loss_history"]) == 8 and all(map(torch.isfinite, map(torch.tensor, a["loss_history"])))
    retries = [m for m, _ in tracker.metrics if "diverged_at_step" in m]
    assert [m["divergence_retries"] for m in retries] == list(range(1, a["divergence_retries"] + 1))
    assert all(m["learning_rate"] == lr * 0.5 ** m["divergence_retries"] for m in retries)
    tensors = load_file(tmp_path / "a" / "noir" / LORA)
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    # The same inputs again, this time rolling back to in-memory snapshots instead of
    # checkpoints: the same retries and the same bytes.
    b, _ = _train(tiny_base, curated, tmp_path / "b", None, learning_rate=lr, max_divergence_retries=8)
    assert b["divergence_retries"] == a["divergence_retries"] and b["loss_history"] == a["loss_history"]
    assert (tmp_path / "a" / "noir" / LORA).read_bytes()[-4096:] == (tmp_path / "b" / "noir" / LORA).read_bytes()[-4096:]
    assert all(torch.equal(t, load_file(tmp_path / "b" / "noir" / LORA)[k]) for k, t in tensors.items())
