"""A bounded queue of drawing jobs with one worker, progress events and cooperative cancellation.

:class:`JobRunner` wraps any ``draw(request, on_step) -> list[Image]`` callable (a
:meth:`StyleModel.generate_images`, or a family's ``generate`` on a pipeline): one worker
thread draws one job at a time (a diffusion pipeline is one model on one device; two draws
at once only share it more slowly), at most `max_pending` jobs wait behind it and a further
`submit` raises :class:`QueueFull` with a retry estimate.

Each :class:`Job` reports what happens to it as :class:`JobEvent`s — ``progress`` after
every step (with a preview frame when the submitter asked for one), then exactly one of
``images``, ``error`` or ``cancelled`` — to a listener callback given at submission (how an
async server waits without holding a thread) and to :meth:`Job.events` / :meth:`Job.wait`
(for threads). Cancellation is cooperative: a pending job is dropped at once; a running one
stops at its next step, because the ``on_step`` the runner hands to `draw` raises
:class:`JobCancelled`. Submitting on a `channel` cancels that channel's previous job first,
so a moved slider restarts its preview instead of queueing behind the stale one.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

Draw = Callable[[Any, Callable[[int, int, Any], None]], list[Any]]
Listener = Callable[["JobEvent"], None]

PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"
FINAL_KINDS = frozenset({"images", "error", "cancelled"})


class JobCancelled(Exception):
    """The job was cancelled (by its owner, by a newer job on its channel, or at shutdown)."""


class QueueFull(RuntimeError):
    """`max_pending` jobs already wait; `retry_after` is a whole-second estimate of when to retry."""

    def __init__(self, pending: int, retry_after: int) -> None:
        super().__init__(f"the job queue is full ({pending} jobs waiting); retry in about {retry_after} s")
        self.pending = pending
        self.retry_after = retry_after


@dataclass(frozen=True)
class JobEvent:
    """One thing that happened to a job.

    `kind`: ``progress`` (`step` of `total` done; `frame` is the submitter's preview of the
    latents, or None), ``images`` (`images`), ``error`` (`error`, the exception draw raised)
    or ``cancelled`` (`reason`)."""

    kind: str
    job_id: int
    step: int | None = None
    total: int | None = None
    frame: Any = None
    images: list[Any] | None = None
    error: BaseException | None = None
    reason: str | None = None

    @property
    def final(self) -> bool:
        return self.kind in FINAL_KINDS


@dataclass(eq=False)
class Job:
    """One submitted request. Created by :meth:`JobRunner.submit`, never directly."""

    id: int
    request: Any
    draw: Draw
    channel: str | None = None
    preview: Callable[[Any], Any] | None = None
    listener: Listener | None = None
    status: str = PENDING
    step: int = 0
    total: int | None = None
    images: list[Any] | None = None
    error: BaseException | None = None
    reason: str | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    _runner: JobRunner | None = field(default=None, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _events: list[JobEvent] = field(default_factory=list, repr=False)

    @property
    def done(self) -> bool:
        return self.status in (DONE, FAILED, CANCELLED)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def cancel(self, reason: str = "cancelled") -> bool:
        """Ask the job to stop; False when it had already finished. A pending job ends at once."""
        if self._runner is None:
            raise RuntimeError("job was not submitted")
        return self._runner._cancel_job(self, reason)

    def events(self, timeout: float | None = None) -> Iterator[JobEvent]:
        """Every event from the first, blocking for the next, until the final one.
        Raises TimeoutError when `timeout` seconds pass without an event."""
        i = 0
        while True:
            with self._cond:
                if i >= len(self._events) and not self._cond.wait_for(lambda i=i: i < len(self._events), timeout):
                    raise TimeoutError(f"job {self.id}: no event in {timeout} s")
                event = self._events[i]
            i += 1
            yield event
            if event.final:
                return

    def wait(self, timeout: float | None = None) -> list[Any]:
        """The images; raises :class:`JobCancelled`, the draw's own exception, or TimeoutError."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"job {self.id} not finished after {timeout} s")
        if self.status == CANCELLED:
            raise JobCancelled(self.reason or "cancelled")
        if self.status == FAILED:
            assert self.error is not None
            raise self.error
        return list(self.images or [])

    def _emit(self, event: JobEvent, status: str | None = None) -> None:
        with self._cond:
            if status is not None:
                self.status = status
                self.finished_at = time.monotonic()
            self._events.append(event)
            self._cond.notify_all()
        if self.listener is not None:
            try:
                self.listener(event)
            except Exception:  # a listener whose consumer has gone (closed event loop) must not stop the worker
                log.debug("job %s: listener failed on %s", self.id, event.kind, exc_info=True)


class JobRunner:
    """One worker thread drawing submitted jobs in order; at most `max_pending` waiting."""

    def __init__(self, draw: Draw | None = None, *, max_pending: int = 16, name: str = "stunning-jobs") -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending}: at least one job must be able to wait")
        self.draw = draw
        self.max_pending = int(max_pending)
        self.name = name
        self._lock = threading.Condition()
        self._queue: deque[Job] = deque()
        self._channels: dict[str, Job] = {}
        self._running: Job | None = None
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._mean_s: float | None = None  # moving average of a job's draw time, for Retry-After
        self.completed = 0
        self.failed = 0
        self.cancelled = 0

    # ------------------------------------------------------------------ queries
    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def running(self) -> Job | None:
        with self._lock:
            return self._running

    @property
    def full(self) -> bool:
        with self._lock:
            return len(self._queue) >= self.max_pending

    def retry_after(self) -> int:
        """Whole seconds until a slot is likely free (at least 1)."""
        with self._lock:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> int:
        mean = self._mean_s if self._mean_s is not None else 1.0
        return max(1, math.ceil(mean))

    # ------------------------------------------------------------------ submitting
    def submit(
        self,
        request: Any,
        *,
        channel: str | None = None,
        draw: Draw | None = None,
        preview: Callable[[Any], Any] | None = None,
        listener: Listener | None = None,
    ) -> Job:
        """Queue `request`; raises :class:`QueueFull` when `max_pending` jobs already wait.

        `draw` overrides the runner's (e.g. bound to the model that was served when the
        request arrived); `preview(latents)` runs in the worker after every step and its
        result is the progress event's `frame`; `listener(event)` is called (from the worker
        thread, or from here for a job cancelled while pending) for every event. A previous
        unfinished job on `channel` is cancelled first (its place in the queue frees up)."""
        fn = draw or self.draw
        if fn is None:
            raise ValueError("no draw function: give one to JobRunner(...) or to submit(...)")
        replaced: Job | None = None
        with self._lock:
            if self._closed:
                raise RuntimeError("the job runner is closed")
            if channel is not None:
                replaced = self._channels.get(channel)
                if replaced is not None and not replaced.done:
                    self._cancel_locked(replaced)
                else:
                    replaced = None
            if len(self._queue) >= self.max_pending:
                pending, retry = len(self._queue), self._retry_after_locked()
            else:
                pending = -1
                job = Job(id=next(self._ids), request=request, draw=fn, channel=channel, preview=preview,
                          listener=listener, _runner=self)
                self._queue.append(job)
                if channel is not None:
                    self._channels[channel] = job
                self._ensure_worker()
                self._lock.notify_all()
        if replaced is not None:
            self._finish_cancel_if_pending(replaced, f"replaced by a newer request on channel {channel!r}")
        if pending >= 0:
            raise QueueFull(pending, retry)
        return job

    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ cancelling
    def _cancel_locked(self, job: Job) -> None:
        """Mark `job` cancelled and drop it from the queue if it waits there (under self._lock)."""
        job._cancel.set()
        if job.status == PENDING and job in self._queue:
            self._queue.remove(job)

    def _finish_cancel_if_pending(self, job: Job, reason: str) -> None:
        """Emit the final event of a job cancelled before it started (outside self._lock)."""
        with job._cond:
            if job.status != PENDING:
                if job.reason is None and not job.done:
                    job.reason = reason  # a running job: the worker emits `cancelled` at its next step
                return
            job.reason = reason
        job._emit(JobEvent("cancelled", job.id, reason=reason), status=CANCELLED)
        with self._lock:
            self.cancelled += 1
            self._forget_channel(job)

    def _cancel_job(self, job: Job, reason: str) -> bool:
        with self._lock:
            if job.done:
                return False
            self._cancel_locked(job)
        self._finish_cancel_if_pending(job, reason)
        return True

    def _forget_channel(self, job: Job) -> None:
        if job.channel is not None and self._channels.get(job.channel) is job:
            del self._channels[job.channel]

    def close(self, timeout: float | None = 10.0) -> None:
        """Cancel everything waiting or running and stop the worker."""
        with self._lock:
            self._closed = True
            jobs = [*self._queue, *([self._running] if self._running else [])]
            for job in jobs:
                self._cancel_locked(job)
            self._lock.notify_all()
            thread = self._thread
        for job in jobs:
            self._finish_cancel_if_pending(job, "the server is shutting down")
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._running = job
                with job._cond:
                    job.status = RUNNING
                    job.started_at = time.monotonic()
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running = None
                    self._forget_channel(job)

    def _run(self, job: Job) -> None:
        def on_step(step: int, total: int, latents: Any) -> None:
            if job._cancel.is_set():
                raise JobCancelled(job.reason or "cancelled")
            frame = job.preview(latents) if job.preview is not None else None
            job.step, job.total = int(step), int(total)
            job._emit(JobEvent("progress", job.id, step=int(step), total=int(total), frame=frame))

        t0 = time.monotonic()
        try:
            if job._cancel.is_set():
                raise JobCancelled(job.reason or "cancelled")
            images = list(job.draw(job.request, on_step))
        except JobCancelled:
            job.reason = job.reason or "cancelled"
            job._emit(JobEvent("cancelled", job.id, reason=job.reason), status=CANCELLED)
            with self._lock:
                self.cancelled += 1
            return
        except Exception as exc:  # the draw's own error travels to the submitter (e.g. an unknown style: 400)
            job.error = exc
            job._emit(JobEvent("error", job.id, error=exc), status=FAILED)
            with self._lock:
                self.failed += 1
            return
        elapsed = time.monotonic() - t0
        job.images = images
        job._emit(JobEvent("images", job.id, images=images), status=DONE)
        with self._lock:
            self.completed += 1
            self._mean_s = elapsed if self._mean_s is None else 0.8 * self._mean_s + 0.2 * elapsed
