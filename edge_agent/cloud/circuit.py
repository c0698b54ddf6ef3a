"""Circuit breaker for the cloud link: after repeated failures, stop waiting on a dead cloud.

closed → (``failure_threshold`` consecutive failures) → open → (``reset_s``, or at once when the
link reconnects: :meth:`CircuitBreaker.probe`) → half_open, where one trial call decides: success
closes, failure opens again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """Thread-safe; ``allow()`` before a call, then ``success()`` or ``failure()``."""

    def __init__(self, failure_threshold: int = 3, reset_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, str], None] | None = None) -> None:
        self.failure_threshold = failure_threshold
        self.reset_s = reset_s
        self._clock = clock
        self._on_change = on_change
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        with self._lock:
            return self._peek()

    def _peek(self) -> str:
        if self._state == OPEN and self._clock() - self._opened_at >= self.reset_s:
            return HALF_OPEN
        return self._state

    def _set(self, state: str) -> None:
        if state != self._state:
            old, self._state = self._state, state
            log.info("event=circuit_changed from=%s to=%s", old, state)
            if self._on_change:
                self._on_change(old, state)

    def allow(self) -> bool:
        """May a call go to the cloud now? In half-open, only one trial at a time."""
        with self._lock:
            state = self._peek()
            if state == CLOSED:
                return True
            if state == HALF_OPEN and not self._trial_in_flight:
                self._set(HALF_OPEN)
                self._trial_in_flight = True
                return True
            return False

    def probe(self) -> None:
        """The link is up again (its channel reconnected): an open circuit lets the next call through
        as its trial now, instead of after the rest of ``reset_s``."""
        with self._lock:
            if self._state == OPEN:
                self._opened_at = self._clock() - self.reset_s
                log.info("event=circuit_probe reason=reconnected")

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            self._trial_in_flight = False
            self._set(CLOSED)

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            self._trial_in_flight = False
            if self._state == HALF_OPEN or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()
                self._set(OPEN)
