"""Loopback helpers for tests."""

from __future__ import annotations

import time
from collections.abc import Callable

from edgecloud.endpoint import free_loopback_port as free_port

__all__ = ["free_port", "wait_for"]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; returns the last result."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
