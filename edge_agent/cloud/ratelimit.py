"""Token bucket for the escalation rate limit: a device never floods the cloud, whatever the line does."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take(n)`` grants as many of n as it has."""

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> int:
        """Take up to ``n`` whole tokens; returns how many were granted (0..n)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            granted = min(n, int(self._tokens))
            self._tokens -= granted
            return granted
