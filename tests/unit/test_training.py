"""LoRA training: dataset, loss goes down, checkpoints and exact resume, tracker.

Everything runs on the tiny embedded model (session fixture `tiny_base`) on the CPU with a
handful of 32x32 images and a few optimizer steps.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from stunning.config import TrainConfig
from stunning.training.checkpoint import CheckpointStore, fingerprint
from stunning.training.dataset import CuratedDataset, DatasetError, style_rows
from stunning.training.evaluation import evaluate_loss
from stunning.training.precision import resolve_mixed_precision
from stunning.training.trainer import train_style
from tests.factories import RecordingTracker, make_curated, tiny_train_config


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    return make_curated(tmp_path_factory.mktemp("curated"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(**kw) -> TrainConfig:
    defaults = {"steps": 8, "batch_size": 2, "checkpoint_every": 4, "learning_rate": 5e-3}
    return tiny_train_config(**{**defaults, **kw})


# --------------------------------------------------------------------------- dataset


def test_dataset_serves_normalised_pixels_and_captions(curated):
    ds = CuratedDataset(curated, "noir", "train")
    assert len(ds) == 6
    item = ds[0]
    assert item["pixels"].shape == (3, 32, 32) and item["pixels"].dtype == torch.float32
    assert -1.0 <= float(item["pixels"].min()) and float(item["pixels"].max()) <= 1.0
    # The PNG round-trips: pixel value v maps to v / 127.5 - 1.
    png = np.asarray(Image.open(curated / ds.rows[0]["path"]).convert("RGB"), dtype=np.float32)
    assert torch.allclose(item["pixels"].permute(1, 2, 0), torch.from_numpy(png / 127.5 - 1.0))
    assert item["caption"].endswith("noir style")
    assert len(CuratedDataset(curated, "noir", "val")) == 2


def test_dataset_errors_name_the_file(tmp_path, curated):
    with pytest.raises(DatasetError, match=r"manifest\.csv.*does not exist"):
        CuratedDataset(tmp_path, "noir")
    broken = shutil.copytree(curated, tmp_path / "broken")
    victim = CuratedDataset(broken, "noir").rows[1]["path"]
    (broken / victim).unlink()
    with pytest.raises(DatasetError, match=victim.replace("/", ".")):
        CuratedDataset(broken, "noir")
    with pytest.raises(DatasetError, match="style='cubist'"):
        CuratedDataset(curated, "cubist")


# --------------------------------------------------------------------------- training


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path, tiny_base, curated):
    from stunning.families import get_family
    from stunning.training.encoding import encode_dataset

    cfg = tiny_cfg(steps=12, learning_rate=1e-2, batch_size=4)
    summary = train_style(
        tiny_base, "sd3", curated, "noir", cfg, tmp_path / "out", None, None, "cpu", sample_seeds=()
    )
    assert summary["steps"] == 12 and len(summary["loss_history"]) == 12
    assert summary["val_loss"] < summary["base_val_loss"]

    # The same objective, the same noise, on the train images: base vs base + saved adapter.
    fam = get_family("sd3")
    pipe = fam.load_pipeline(tiny_base, torch.device("cpu"), torch.float32)
    latents, cond = encode_dataset(fam, pipe, CuratedDataset(curated, "noir"), cfg.seed)
    sched = fam.noise_scheduler(pipe)
    before = evaluate_loss(fam, pipe, sched, latents, cond, seed=123, batch_size=6)
    pipe.load_lora_weights(str(tmp_path / "out" / "noir"))
    after = evaluate_loss(fam, pipe, sched, latents, cond, seed=123, batch_size=6)
    assert after < 0.9 * before, (before, after)


def _adapter(out: Path, style: str = "noir") -> dict[str, torch.Tensor]:
    return load_file(out / style / "pytorch_lora_weights.safetensors")


class Crash(RuntimeError):
    pass


def test_interrupted_run_resumes_to_the_same_adapter(tmp_path, tiny_base, curated):
    # Gradient accumulation, LoRA dropout and a warm-up + cosine schedule included: every
    # source of randomness and every piece of optimizer/scheduler state must come back.
    cfg = tiny_cfg(gradient_accumulation=2, dropout=0.1, lr_scheduler="cosine", lr_warmup_steps=3, ema_decay=0.9,
                   caption_dropout=0.3, gradient_checkpointing=True)
    straight = train_style(
        tiny_base, "sd3", curated, "noir", cfg, tmp_path / "a", None, tmp_path / "ck-a", "cpu", sample_seeds=()
    )

    def crash_after_6(step, loss):
        if step == 6:  # two steps past the checkpoint at 4: they are lost and redone
            raise Crash("power cut")

    tracker = RecordingTracker()
    with pytest.raises(Crash):
        train_style(
            tiny_base,
            "sd3",
            curated,
            "noir",
            cfg,
            tmp_path / "b",
            tracker,
            tmp_path / "ck-b",
            "cpu",
            on_step=crash_after_6,
            sample_seeds=(),
        )
    assert tracker.ended == ["FAILED"]
    assert not (tmp_path / "b" / "noir").exists()
    [fp_dir] = (tmp_path / "ck-b" / "noir").iterdir()
    assert [p.name for _, p in CheckpointStore(fp_dir, 2).steps()] == ["step-4"]

    resumed = train_style(
        tiny_base, "sd3", curated, "noir", cfg, tmp_path / "b", None, tmp_path / "ck-b", "cpu", sample_seeds=()
    )
    assert resumed["resumed_from_step"] == 4
    assert resumed["fingerprint"] == straight["fingerprint"]
    np.testing.assert_allclose(resumed["loss_history"], straight["loss_history"], rtol=1e-5, atol=1e-6)
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    # A different run would differ: the comparison above is not vacuous.
    assert any(a[k].abs().max() > 1e-4 for k in a if "lora_B" in k or "lora.up" in k)


def test_checkpoints_are_pruned_and_a_finished_run_is_reused(tmp_path, tiny_base, curated):
    cfg = tiny_cfg(steps=6, checkpoint_every=2, keep_checkpoints=2)
    first = train_style(
        tiny_base, "sd3", curated, "noir", cfg, tmp_path / "a", None, tmp_path / "ck", "cpu", sample_seeds=()
    )
    store = CheckpointStore.for_run(tmp_path / "ck", "noir", first["fingerprint"], 2)
    assert [s for s, _ in store.steps()] == [4, 6]
    state = json.loads((store.root / "step-6" / "state.json").read_text())
    assert state["step"] == 6 and len(state["loss_history"]) == 6
    assert {p.name for p in (store.root / "step-6").iterdir()} == {
        "lora.safetensors",
        "optimizer.pt",
        "rng.safetensors",
        "state.json",
    }

    # Bookkeeping keys do not change the weights, so changing them still resumes.
    bookkeeping = cfg.model_copy(update={"keep_checkpoints": 3, "sample_prompt": "a blue hat"})
    again = train_style(
        tiny_base,
        "sd3",
        curated,
        "noir",
        bookkeeping,
        tmp_path / "b",
        None,
        tmp_path / "ck",
        "cpu",
        sample_seeds=(),
    )
    assert again["resumed_from_step"] == 6 and again["steps_per_s"] is None
    assert again["loss_history"] == first["loss_history"]
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # A broken newest checkpoint is skipped, not trusted.
    (store.root / "step-6" / "state.json").write_text("{not json")
    assert store.latest().step == 4

    # A changed config has another fingerprint: a fresh run, not a resume.
    changed = train_style(
        tiny_base,
        "sd3",
        curated,
        "noir",
        cfg.model_copy(update={"learning_rate": 1e-3}),
        tmp_path / "c",
        None,
        tmp_path / "ck",
        "cpu",
        sample_seeds=(),
    )
    assert changed["resumed_from_step"] == 0 and changed["fingerprint"] != first["fingerprint"]


def test_fingerprint_tracks_config_base_and_data(tmp_path, tiny_base, curated):
    data = shutil.copytree(curated, tmp_path / "data")
    base = shutil.copytree(tiny_base, tmp_path / "base")
    cfg = tiny_cfg().model_dump()

    def fp(cfg=cfg):
        return fingerprint(cfg, base, style_rows(data, "noir"), data, extra={"style": "noir"})

    ref = fp()
    assert fp() == ref
    assert fp({**cfg, "rank": 8}) != ref
    # Another style's images do not matter; this style's do, byte for byte.
    other = data / style_rows(data, "impressionist")[0]["path"]
    other.write_bytes(other.read_bytes() + b"\0")
    assert fp() == ref
    mine = data / style_rows(data, "noir")[0]["path"]
    mine.write_bytes(mine.read_bytes() + b"\0")
    changed_data = fp()
    assert changed_data != ref
    cfg_file = base / "transformer" / "config.json"
    unet_cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**unet_cfg, "sample_size": 16}))
    assert fp() != changed_data


def test_fingerprint_of_a_large_base_file_is_the_same_on_another_machine(tmp_path, monkeypatch, curated):
    """Files over HASH_LIMIT_BYTES are identified by sampled blocks, not the modification time:
    a base model copied (or pulled) to another machine fingerprints the same there, so a
    checkpoint carried from a worker resumes; a changed sampled block still changes it."""
    from stunning.training import checkpoint

    monkeypatch.setattr(checkpoint, "HASH_LIMIT_BYTES", 1024)
    monkeypatch.setattr(checkpoint, "SAMPLE_BYTES", 256)
    base = tmp_path / "base"
    base.mkdir()
    (base / "weights.bin").write_bytes(bytes(range(256)) * 40)  # 10 KiB: "large"

    def fp(folder: Path) -> str:
        return fingerprint({"rank": 4}, folder, style_rows(curated, "noir"), curated)

    ref = fp(base)
    other = shutil.copytree(base, tmp_path / "elsewhere")  # new modification times
    os.utime(other / "weights.bin", (1, 1))
    assert fp(other) == ref
    data = bytearray((other / "weights.bin").read_bytes())
    data[-1] ^= 0xFF  # in the last sampled block
    (other / "weights.bin").write_bytes(bytes(data))
    assert fp(other) != ref


def test_tracker_gets_params_losses_throughput_memory_and_artifacts(tmp_path, monkeypatch, tiny_base, curated):
    tracker = RecordingTracker()
    cfg = tiny_cfg(steps=4, sample_every=2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)  # the trainer lowers it for the tiny model, then restores it
    summary = train_style(
        tiny_base,
        "sd3",
        curated,
        "impressionist",
        cfg,
        tmp_path / "out",
        tracker,
        None,
        "cpu",
        samples_dir=tmp_path / "samples",
    )
    assert tracker.runs == [
        ("train-impressionist", {"style": "impressionist", "stage": "train", "fingerprint": summary["fingerprint"]})
    ]
    assert summary["mlflow_run_id"] == "run-1" and tracker.ended == ["FINISHED"]
    assert tracker.params["n_images"] == 6 and tracker.params["train.rank"] == 4
    assert tracker.params["device"] == "cpu" and tracker.params["style"] == "impressionist"
    assert tracker.params["cpu_threads"] == 1 and torch.get_num_threads() == 2
    torch.set_num_threads(1)
    losses = {step: m["loss"] for m, step in tracker.metrics if "loss" in m}
    assert sorted(losses) == [1, 2, 3, 4] and list(losses.values()) == summary["loss_history"]
    final = {k: v for m, step in tracker.metrics if step is None for k, v in m.items()}
    assert final["steps_per_s"] > 0 and final["images_per_s"] == pytest.approx(final["steps_per_s"] * 2)
    assert final["peak_memory_mb"] > 0 and final["val_loss"] == summary["val_loss"]
    kinds = [artifact_path for _, artifact_path in tracker.artifacts]
    assert kinds == ["samples/step-2", "adapter", "samples"]
    pngs = sorted(p.name for p in (tmp_path / "samples" / "impressionist").glob("*.png"))
    assert pngs == ["seed-0.png", "seed-1.png", "seed-2.png", "seed-3.png"]
    assert Image.open(tmp_path / "samples" / "impressionist" / "seed-0.png").size == (32, 32)
    saved = yaml.safe_load((tmp_path / "out" / "impressionist" / "train_config.yaml").read_text())
    assert TrainConfig.model_validate(saved) == cfg

    # Sampling during training does not disturb it: the same losses without it.
    quiet = train_style(
        tiny_base,
        "sd3",
        curated,
        "impressionist",
        cfg.model_copy(update={"sample_every": 0}),
        tmp_path / "quiet",
        None,
        None,
        "cpu",
        sample_seeds=(),
    )
    assert quiet["loss_history"] == summary["loss_history"]


def test_small_models_train_single_threaded_on_cpu(monkeypatch, tiny_base):
    from stunning.families import get_family
    from stunning.training.precision import cpu_threads_for

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    unet = get_family("sd3").load_pipeline(tiny_base, torch.device("cpu"), torch.float32).transformer
    assert cpu_threads_for(unet, torch.device("cpu")) == 1
    assert cpu_threads_for(unet, torch.device("cuda")) is None
    big = torch.nn.Linear(5000, 5000)  # 25M parameters
    assert cpu_threads_for(big, torch.device("cpu")) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's explicit choice wins
    assert cpu_threads_for(unet, torch.device("cpu")) is None


def test_mixed_precision_choice():
    cpu = torch.device("cpu")
    assert resolve_mixed_precision("auto", cpu) == "no"
    assert resolve_mixed_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_mixed_precision("fp16", cpu)
    mps = torch.device("mps")  # a device object needs no Mac; the choice is what the probe returns
    assert resolve_mixed_precision("auto", mps, mps_choice="bf16") == "bf16"
    assert resolve_mixed_precision("auto", mps, mps_choice="fp16") == "fp16"
    assert resolve_mixed_precision("auto", mps) in ("bf16", "fp16")
    assert resolve_mixed_precision("no", mps) == "no"


def test_encoding_cache_is_keyed_by_content_and_changes_nothing(tmp_path, tiny_base, curated):
    """A cached run trains exactly like an uncached one; a second run encodes nothing; a
    changed caption is re-encoded and only that one."""
    from stunning.families import get_family
    from stunning.training.cache import EncodingCache
    from stunning.training.dataset import CuratedDataset
    from stunning.training.encoding import encode_dataset

    fam = get_family("sd3")
    pipe = fam.load_pipeline(tiny_base, torch.device("cpu"), torch.float32)
    data = CuratedDataset(curated, "noir", "train")
    plain = encode_dataset(fam, pipe, data, seed=3)
    cache = EncodingCache(tmp_path / "cache", tiny_base)
    first = encode_dataset(fam, pipe, data, seed=3, cache=cache)
    assert cache.hits == 0 and cache.misses == 2 * len(data)
    for a, b in zip(plain, first, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # per-image vs batched encoding: float noise
    again = EncodingCache(tmp_path / "cache", tiny_base)
    second = encode_dataset(fam, pipe, data, seed=3, cache=again)
    assert again.misses == 0 and again.hits == 2 * len(data)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    manifest = curated / "manifest.csv"
    text = manifest.read_text()
    row = next(line for line in text.splitlines() if ",noir,train," in line)
    manifest.write_text(text.replace(row, row.replace("noir style", "noir style, film grain"), 1))
    try:
        third = EncodingCache(tmp_path / "cache", tiny_base)
        encode_dataset(fam, pipe, CuratedDataset(curated, "noir", "train"), seed=3, cache=third)
        assert third.misses == 1 and third.hits == 2 * len(data) - 1
    finally:
        manifest.write_text(text)


def test_cpu_calibration_measures_and_is_kept_for_resume(tmp_path, monkeypatch, tiny_base, curated):
    """With mixed_precision auto on a CPU the trainer times trial steps to choose the thread
    count, stays fp32, and checkpoints the choice."""
    import stunning.training.loop as loop
    import stunning.training.precision as precision

    timed: list[tuple[int, str]] = []
    time_steps = precision._time_steps

    def recording(*args):
        timed.append((torch.get_num_threads(), args[-1]))
        return time_steps(*args)

    monkeypatch.setattr(precision, "_time_steps", recording)
    monkeypatch.setattr(loop, "cpu_threads_for", lambda model, dev: 1)  # the small-model rule: one thread
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the default count the calibration may return to
    try:
        _calibration_runs(tmp_path, monkeypatch, tiny_base, curated, loop, precision, timed)
    finally:
        torch.set_num_threads(before)


def _calibration_runs(tmp_path, monkeypatch, tiny_base, curated, loop, precision, timed):
    # Tiny steps are overhead-bound: one trial, no other thread count tried.
    fast = train_style(tiny_base, "sd3", curated, "noir", tiny_cfg(steps=2), tmp_path / "a", None, None, "cpu",
                       sample_seeds=())
    assert fast["mixed_precision"] == "no" and timed == [(1, "no")]
    # Every step compute-bound and any speed-up enough: the default thread count is tried and
    # chosen, precision stays fp32, and the checkpoint records what a resume reuses.
    monkeypatch.setattr(precision, "CPU_BOUND_STEP_S", 0.0)
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 0.0)
    timed.clear()
    cfg = tiny_cfg(steps=4, checkpoint_every=2)
    tracker = RecordingTracker()
    first = train_style(tiny_base, "sd3", curated, "noir", cfg, tmp_path / "b", tracker, tmp_path / "ck", "cpu",
                        sample_seeds=())
    assert timed == [(1, "no"), (2, "no")] and tracker.params["cpu_threads_chosen"] == 2
    assert first["mixed_precision"] == "no" == tracker.params["mixed_precision_chosen"]
    expected = "no"
    store = CheckpointStore.for_run(tmp_path / "ck", "noir", first["fingerprint"], 2)
    assert store.latest().meta["cpu_setup"][1] == expected
    monkeypatch.setattr(loop, "calibrate_cpu", lambda *a, **k: pytest.fail("a resume must not re-calibrate"))
    again = train_style(tiny_base, "sd3", curated, "noir", cfg, tmp_path / "b", None, tmp_path / "ck", "cpu",
                        sample_seeds=())
    assert again["resumed_from_step"] == 4 and again["mixed_precision"] == expected
