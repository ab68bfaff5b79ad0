"""Batch size that fits: OOM detection on real exception objects, the probing search and its
caps (MPS tensor limit, CPU memory), `batch_size: auto` in the trainer (no trace on the result,
never re-probed on resume), and halving the batch when a training step runs out of memory."""

from __future__ import annotations

import pytest
import torch

from stunning.config import TrainConfig
from stunning.training.batch import BatchSizeError, find_batch_size, mps_batch_cap
from stunning.training.memory import is_oom_error

MB = 2**20
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB total capacity; 13.10 GiB already "
    "allocated; 1.23 GiB free; 13.40 GiB reserved in total by PyTorch)"
)
MPS_OOM = (
    "MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.21 GB, max allowed: 18.13 GB). "
    "Tried to allocate 256.00 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper "
    "limit for memory allocations (may cause system failure)."
)


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 -- the point is to capture the real object
        return exc
    raise AssertionError("did not raise")


# --------------------------------------------------------------------------- is_oom_error


def test_oom_errors_are_recognised():
    assert is_oom_error(torch.cuda.OutOfMemoryError(CUDA_OOM))
    assert is_oom_error(RuntimeError(CUDA_OOM))  # older PyTorch raised a plain RuntimeError
    assert is_oom_error(RuntimeError(MPS_OOM))
    assert is_oom_error(RuntimeError("[MPSNDArray initWithDevice:descriptor:] Error: total bytes of NDArray > 2**32"))
    assert is_oom_error(RuntimeError("Invalid buffer size: 6.50 GB"))
    # A real allocation failure of the CPU allocator.
    assert is_oom_error(_raised(lambda: torch.empty(2**62, dtype=torch.uint8)))


def test_other_errors_are_not_oom():
    shape_error = _raised(lambda: torch.ones(2, 3) @ torch.ones(4, 5))
    assert isinstance(shape_error, RuntimeError) and not is_oom_error(shape_error)
    assert not is_oom_error(ValueError("CUDA out of memory"))  # only the types PyTorch raises
    assert not is_oom_error(KeyError("batch"))


# --------------------------------------------------------------------------- find_batch_size


class FakeStep:
    """A trial step that runs out of (CUDA) memory above `limit` images; records the sizes."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.sizes: list[int] = []

    def __call__(self, batch_size: int) -> None:
        self.sizes.append(batch_size)
        if self.limit is not None and batch_size > self.limit:
            raise RuntimeError(CUDA_OOM)


@pytest.mark.parametrize(("limit", "tried"), [(6, [1, 2, 4, 8, 6, 7]), (8, [1, 2, 4, 8, 16, 12, 10, 9]), (1, [1, 2])])
def test_search_finds_the_largest_size_below_the_oom_threshold(limit, tried):
    step = FakeStep(limit)
    search = find_batch_size(step, 1, 16, "cuda")
    assert search.batch_size == limit and step.sizes == tried and search.tried == tried
    assert search.limited_by == "oom"


def test_search_backs_off_from_a_too_large_start_and_respects_max_batch():
    step = FakeStep(3)
    assert find_batch_size(step, 16, 32, "cuda").batch_size == 3
    assert step.sizes == [16, 8, 4, 2, 3]

    step = FakeStep()
    search = find_batch_size(step, 1, 5, "cuda")
    assert search.batch_size == 5 and step.sizes == [1, 2, 4, 5] and search.limited_by == "max_batch"


def test_mps_cap_keeps_the_biggest_tensor_under_the_limit():
    # SD 1.5 at 512 px: 64x64 latents, 8 heads, fp32 attention scores of 512 MiB per image.
    assert mps_batch_cap((4, 64, 64)) == 4
    assert mps_batch_cap((4, 64, 64), bytes_per_element=2) == 8
    assert mps_batch_cap((16, 64, 64), heads=24, patch_size=2) == 21  # sd3-like: 2x2 patches, 1024 tokens
    assert mps_batch_cap((4, 256, 256)) == 1  # never below one
    step = FakeStep()
    search = find_batch_size(step, 1, 16, "mps", latent_shape=(4, 64, 64))
    assert search.batch_size == 4 and max(step.sizes) == 4 and search.limited_by == "mps_cap"
    # The cap applies only on MPS.
    assert find_batch_size(FakeStep(), 1, 16, "cuda", latent_shape=(4, 64, 64)).batch_size == 16


def test_cpu_search_stops_where_the_projected_memory_would_not_fit():
    step = FakeStep()

    def growth(run) -> int:  # 100 MB per image above the baseline
        run()
        return step.sizes[-1] * 100 * MB

    search = find_batch_size(step, 1, 64, "cpu", available_bytes=1000 * MB, peak_growth=growth)
    # 80 % of 1000 MB fits 8 images of 100 MB; 16 is never tried.
    assert search.batch_size == 8 and step.sizes == [1, 2, 4, 8] and search.limited_by == "memory"
    assert [t.growth_bytes for t in search.trials] == [100 * MB, 200 * MB, 400 * MB, 800 * MB]


def test_non_oom_errors_propagate_unchanged():
    error = ValueError("latents and conditioning disagree")

    def step(batch_size: int) -> None:
        if batch_size == 4:
            raise error

    with pytest.raises(ValueError) as info:
        find_batch_size(step, 1, 16, "cuda")
    assert info.value is error


def test_even_one_image_out_of_memory_says_what_to_do():
    with pytest.raises(BatchSizeError, match=r"batch of 1.*data\.resolution.*train\.rank.*gradient_checkpointing"):
        find_batch_size(FakeStep(0), 4, 16, "cuda")


def test_config_accepts_auto_and_names_bad_values():
    assert TrainConfig(batch_size="auto").batch_size == "auto"
    assert TrainConfig(batch_size="AUTO").batch_size == "auto"
    assert TrainConfig().batch_size == 4 and TrainConfig().max_batch_size == 16
    for bad in (0, "big", 2.5, True):
        with pytest.raises(ValueError, match="train.batch_size"):
            TrainConfig(batch_size=bad)


# --------------------------------------------------------------------------- in the trainer


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    from tests.factories import make_curated

    return make_curated(tmp_path_factory.mktemp("curated"))


def _train(base, curated, cfg, out, tracker=None, checkpoints=None, **kw):
    from stunning.training.trainer import train_style

    return train_style(base, kw.pop("family", "sd3"), curated, "noir", cfg, out, tracker, checkpoints, "cpu",
                       sample_seeds=(), **kw)


def _cfg(**kw) -> TrainConfig:
    # Precision pinned: with "auto" the CPU calibration's trial steps would meet the faked
    # out-of-memory errors before the loop whose handling these tests check.
    from tests.factories import tiny_train_config

    return tiny_train_config(**{"steps": 4, "batch_size": 2, "checkpoint_every": 2, "learning_rate": 5e-3,
                                "mixed_precision": "no", **kw})


@pytest.mark.usefixtures("one_torch_thread")
def test_auto_batch_size_is_probed_reported_and_leaves_no_trace(tmp_path, tiny_base, curated):
    from tests.factories import RecordingTracker

    auto = _cfg(batch_size="auto", max_batch_size=4, dropout=0.1)
    tracker = RecordingTracker()
    summary = _train(tiny_base, curated, auto, tmp_path / "auto", tracker)
    assert summary["batch_size"] == 4 and summary["batch_backoffs"] == 0 and len(summary["loss_history"]) == 4
    assert tracker.params["batch_size"] == 4 and tracker.params["batch_size_source"] == "probe"
    assert tracker.params["train.batch_size"] == "auto"
    final = {k: v for m, step in tracker.metrics if step is None for k, v in m.items()}
    assert final["batch_size"] == 4 and final["images_per_s"] == pytest.approx(final["steps_per_s"] * 4)

    # The trial steps changed nothing: the same run as with batch_size: 4 given outright
    # (LoRA dropout on, so the global RNG had to be put back too).
    fixed = _train(tiny_base, curated, auto.model_copy(update={"batch_size": 4}), tmp_path / "fixed")
    assert fixed["loss_history"] == summary["loss_history"]


@pytest.mark.usefixtures("one_torch_thread")
def test_resume_reuses_the_checkpointed_batch_size_without_probing(tmp_path, monkeypatch, tiny_base, curated):
    from stunning.training import batch
    from tests.factories import RecordingTracker

    cfg = _cfg(batch_size="auto", max_batch_size=4)
    straight = _train(tiny_base, curated, cfg, tmp_path / "a", checkpoints=tmp_path / "ck-a")

    def crash_at_3(step, loss):
        if step == 3:
            raise KeyError("power cut")

    with pytest.raises(KeyError):
        _train(tiny_base, curated, cfg, tmp_path / "b", checkpoints=tmp_path / "ck-b", on_step=crash_at_3)

    def no_probe(*args, **kwargs):
        raise AssertionError("a resumed run must not probe the batch size again")

    monkeypatch.setattr(batch, "find_batch_size", no_probe)
    tracker = RecordingTracker()
    resumed = _train(tiny_base, curated, cfg, tmp_path / "b", tracker, checkpoints=tmp_path / "ck-b")
    assert resumed["resumed_from_step"] == 2 and resumed["batch_size"] == straight["batch_size"] == 4
    assert tracker.params["batch_size_source"] == "checkpoint"
    assert resumed["loss_history"] == pytest.approx(straight["loss_history"], rel=1e-5, abs=1e-6)


def _flaky_family(monkeypatch, fail_when):
    """The sd3 family whose training loss raises an OOM RuntimeError when `fail_when(batch)`
    says so, after drawing noise like a real step would (so a retry must rewind the RNG)."""
    from stunning.families import get_family

    fam = get_family("sd3")
    real = fam.training_loss
    failures: list[int] = []

    def training_loss(pipe, latents, cond, generator, scheduler=None, reduce=True):
        if torch.is_grad_enabled() and fail_when(latents.shape[0], failures):
            torch.randn(latents.shape, generator=generator, device=latents.device)
            failures.append(latents.shape[0])
            raise RuntimeError(CUDA_OOM)
        return real(pipe, latents, cond, generator, scheduler=scheduler, reduce=reduce)

    monkeypatch.setattr(fam, "training_loss", training_loss)
    return fam, failures


@pytest.mark.usefixtures("one_torch_thread")
def test_a_step_that_runs_out_of_memory_is_redone_with_half_the_batch(tmp_path, monkeypatch, tiny_base, curated):
    from tests.factories import RecordingTracker

    cfg = _cfg(batch_size=4, caption_dropout=0.3, dropout=0.1)
    fam, failures = _flaky_family(monkeypatch, lambda b, failures: b > 2 and not failures)
    tracker = RecordingTracker()
    summary = _train(tiny_base, curated, cfg, tmp_path / "flaky", tracker, tmp_path / "ck", family=fam)
    assert failures == [4]
    assert summary["batch_size"] == 2 and summary["batch_backoffs"] == 1 and len(summary["loss_history"]) == 4
    per_step = {step: m for m, step in tracker.metrics if step is not None}
    assert per_step[1]["batch_size"] == 2
    # The step was rewound (generators, dropout RNG, gradients) and redone: the run is the one
    # that batch_size: 2 gives from the start.
    monkeypatch.undo()
    plain = _train(tiny_base, curated, cfg.model_copy(update={"batch_size": 2}), tmp_path / "plain")
    assert summary["loss_history"] == plain["loss_history"]
    # The halved batch is what the checkpoint records for a resume.
    from stunning.training.checkpoint import CheckpointStore

    store = CheckpointStore.for_run(tmp_path / "ck", "noir", summary["fingerprint"], 2)
    assert store.latest().meta["batch_size"] == 2


@pytest.mark.usefixtures("one_torch_thread")
def test_out_of_memory_at_batch_one_and_other_errors(tmp_path, monkeypatch, tiny_base, curated):
    fam, failures = _flaky_family(monkeypatch, lambda b, failures: True)
    with pytest.raises(BatchSizeError, match=r"step 1 .*batch of 1 image.*gradient_checkpointing"):
        _train(tiny_base, curated, _cfg(batch_size=2), tmp_path / "oom", family=fam)
    assert failures == [2, 1]

    error = ValueError("not a memory problem")

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(fam, "training_loss", broken)
    with pytest.raises(ValueError) as info:
        _train(tiny_base, curated, _cfg(batch_size=2), tmp_path / "bug", family=fam)
    assert info.value is error
