"""The studio's job runner on a real tiny pipeline: order, progress, cancellation, channels, limits.

Jobs draw with the tiny sd3 model's own sampler (`Family.generate` with its `on_step`
callback); where a test needs the worker held at a known point, a listener (which the runner
calls from the worker thread) waits on an event, so nothing depends on timing.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from stunning.studio.jobs import CANCELLED, DONE, FAILED, JobCancelled, JobRunner, QueueFull


@pytest.fixture(scope="module")
def draw(tiny_base, one_torch_thread):
    """`draw({"prompt", "seed", "steps"[, "negatives"]}, on_step)` on the tiny sd3 pipeline."""
    import torch

    from stunning.families import get_family

    family = get_family("sd3")
    pipe = family.load_pipeline(tiny_base, torch.device("cpu"), torch.float32)

    def run(req: dict, on_step):
        return family.generate(pipe, [req["prompt"]], [req["seed"]], req["steps"], 4.0,
                               negative_prompts=req.get("negatives"), on_step=on_step)

    return run


def _req(seed: int = 0, steps: int = 2, **kw) -> dict:
    return {"prompt": "a red hat", "seed": seed, "steps": steps, **kw}


def _held(gate: threading.Event, started: threading.Event):
    """A listener that holds the worker at the job's first step until `gate` is set."""

    def listener(event):
        if event.kind == "progress" and event.step == 1:
            started.set()
            assert gate.wait(30), "test did not release the worker"

    return listener


def test_a_job_reports_each_step_then_its_images(draw):
    runner = JobRunner(draw)
    try:
        job = runner.submit(_req(seed=3, steps=3), preview=lambda latents: tuple(latents.shape))
        events = list(job.events(timeout=60))
        assert [(e.kind, e.step, e.total) for e in events[:-1]] == [("progress", s, 3) for s in (1, 2, 3)]
        assert all(e.frame is not None and e.frame[0] == 1 and len(e.frame) == 4 for e in events[:-1])
        assert events[-1].kind == "images" and job.status == DONE
        again = draw(_req(seed=3, steps=3), None)[0]  # the same request drawn directly: the same pixels
        assert np.array_equal(np.asarray(job.wait(1)[0]), np.asarray(again))
        assert runner.completed == 1 and runner.pending == 0
    finally:
        runner.close()


def test_a_running_job_cancelled_stops_at_its_next_step(draw):
    runner = JobRunner(draw)
    try:
        seen = []

        def listener(event):
            seen.append(event)
            if event.kind == "progress" and event.step == 2:
                job.cancel("changed my mind")  # from the worker thread, mid-draw

        job = runner.submit(_req(steps=50), listener=listener)
        with pytest.raises(JobCancelled, match="changed my mind"):
            job.wait(60)
        assert [e.step for e in seen if e.kind == "progress"] == [1, 2]
        assert seen[-1].kind == "cancelled" and job.status == CANCELLED and runner.cancelled == 1
        assert job.cancel() is False  # already finished
        assert runner.submit(_req()).wait(60)  # the worker carries on
    finally:
        runner.close()


def test_a_new_job_on_a_channel_cancels_the_previous_one_pending_or_running(draw):
    runner = JobRunner(draw, max_pending=2)
    gate, started = threading.Event(), threading.Event()
    try:
        running = runner.submit(_req(steps=20), channel="slider", listener=_held(gate, started))
        assert started.wait(30)
        pending = runner.submit(_req(seed=1), channel="other")
        replacement = runner.submit(_req(seed=2), channel="slider")  # cancels the running one
        latest = runner.submit(_req(seed=3), channel="other")  # cancels the pending one at once
        assert pending.status == CANCELLED and "channel 'other'" in pending.reason
        assert runner.pending == 2  # replacement and latest; the cancelled one left the queue
        gate.set()
        with pytest.raises(JobCancelled, match="replaced by a newer request on channel 'slider'"):
            running.wait(60)
        assert running.step == 1  # it stopped at the step after the cancel
        assert len(replacement.wait(60)) == 1 and len(latest.wait(60)) == 1
    finally:
        gate.set()
        runner.close()


def test_a_full_queue_refuses_with_a_retry_estimate(draw):
    runner = JobRunner(draw, max_pending=1)
    gate, started = threading.Event(), threading.Event()
    try:
        first = runner.submit(_req(), listener=_held(gate, started))
        assert started.wait(30)
        waiting = runner.submit(_req(seed=1))
        assert runner.full
        with pytest.raises(QueueFull) as err:
            runner.submit(_req(seed=2))
        assert err.value.pending == 1 and err.value.retry_after >= 1
        gate.set()
        assert first.wait(60) and waiting.wait(60)
        assert not runner.full and runner.submit(_req(seed=2)).wait(60)
    finally:
        gate.set()
        runner.close()


def test_a_failing_draw_reports_its_error_and_the_worker_carries_on(draw):
    runner = JobRunner(draw)
    try:
        bad = runner.submit(_req(negatives=["one", "two"]))  # two negatives for one prompt
        with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
            bad.wait(60)
        assert bad.status == FAILED and list(bad.events(1))[-1].kind == "error"
        assert runner.submit(_req()).wait(60) and runner.failed == 1
    finally:
        runner.close()


def test_jobs_submitted_from_many_threads_each_get_their_own_image(draw):
    from concurrent.futures import ThreadPoolExecutor

    expected = {seed: np.asarray(draw(_req(seed=seed), None)[0]) for seed in (0, 1)}
    runner = JobRunner(draw, max_pending=16)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            jobs = list(pool.map(lambda i: runner.submit(_req(seed=i % 2)), range(12)))
        for i, job in enumerate(jobs):
            assert np.array_equal(np.asarray(job.wait(120)[0]), expected[i % 2]), i
        assert runner.completed == 12 and len({job.id for job in jobs}) == 12
    finally:
        runner.close()


def test_closing_cancels_what_waits_and_what_runs(draw):
    runner = JobRunner(draw)
    gate, started = threading.Event(), threading.Event()
    running = runner.submit(_req(steps=20), listener=_held(gate, started))
    assert started.wait(30)
    waiting = runner.submit(_req())
    closer = threading.Thread(target=runner.close)
    closer.start()
    with pytest.raises(JobCancelled, match="shutting down"):
        waiting.wait(30)
    gate.set()
    closer.join(30)
    assert running.status == CANCELLED and not closer.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        runner.submit(_req())
