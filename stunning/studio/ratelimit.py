"""Per-client rate limiting: one token bucket per API key (or per address without keys).

A bucket holds up to `burst` tokens and refills at `per_minute / 60` tokens a second; a
request takes one token or is refused with the whole seconds until one is back (what the
server sends as `Retry-After`). Buckets of idle clients are dropped once there are many, so
a stream of one-off clients cannot grow the table without bound.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

MAX_BUCKETS = 10_000  # beyond this, full (idle) buckets are forgotten


class RateLimiter:
    """Token buckets by client id; thread-safe. `per_minute <= 0` turns limiting off."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 and per_minute > 0:
            raise ValueError(f"burst={burst}: a bucket must hold at least one request")
        self.per_minute = float(per_minute)
        self.burst = int(burst)
        self.rate = self.per_minute / 60.0  # tokens per second
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, client: str) -> int:
        """0 when `client` may go ahead (one token taken), else the whole seconds to wait."""
        if not self.enabled:
            return 0
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                if len(self._buckets) > MAX_BUCKETS:
                    self._forget_idle(now)
                return 0
            self._buckets[client] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self.rate))

    def _forget_idle(self, now: float) -> None:
        for client, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.rate >= self.burst:
                del self._buckets[client]
