"""The pieces every fault is played with: config files for the services, a load of calls with request
ids (so the store can be checked case by case), the hard-example store read back, and the agent's
Prometheus figures.

The load runs in threads of this process on edgecloud's own client: a fault needs each call's request
id, status and flags, not a throughput figure (the overload, which does, runs on the bench's client
processes).
"""

from __future__ import annotations

import sqlite3
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from edgecloud.client import KServeClient
from edgecloud.metrics.names import PREFIX
from edgecloud.protocol.parameters import AgentRequest, AgentResponse
from edgecloud_tools.faults.plan import Outcome
from edgecloud_tools.rig.services import wait_until
from edgecloud_tools.rig.stats import latency_summary


def agent_metric(port: int, name: str) -> float | None:
    """One sample of the agent's ``/metrics``, ``edgecloud_<name>`` (the first with that name); None when
    not served."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == PREFIX + name:
                return sample.value
    return None


def agent_count(port: int, name: str) -> int:
    """A count of the agent's ``/metrics`` (a depth, a total); 0 when not served."""
    return int(agent_metric(port, name) or 0)


def stored_rows(store: Path) -> Counter:
    """Rows per (device, request id) in a gateway's hard-example store (empty before it exists)."""
    if not store.exists():
        return Counter()
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5.0) as conn:
        return Counter({(device, rid): n for device, rid, n in conn.execute(
            "SELECT device, request_id, COUNT(*) FROM examples GROUP BY device, request_id")})


def stored_once(store: Path, device: str, request_ids: set[str]) -> tuple[int, int, int]:
    """Of ``request_ids`` (one row each), how many the store holds exactly once, how many it lacks and
    how many it holds more than once."""
    rows = stored_rows(store)
    counts = [rows.get((device, rid), 0) for rid in request_ids]
    return counts.count(1), counts.count(0), sum(1 for n in counts if n > 1)


@dataclass
class Call:
    request_id: str
    ms: float | None  # None when it failed
    code: str  # OK, or the gRPC status name
    degraded: bool = False
    source: str = ""
    sent_at: float = 0.0  # time.monotonic()
    detail: str = ""
    version: str = ""  # the model version that answered


@dataclass
class Load:
    """Calls to an agent (or a gateway) from ``streams`` threads, each on its own channel, every call
    with its own request id (``prefix-N``), until ``stop()`` or ``max_calls``."""

    port: int
    model: str
    input_name: str
    images: np.ndarray
    prefix: str
    streams: int = 4
    max_calls: int = 1_000_000
    params: Mapping[str, Any] = field(default_factory=dict)
    batch: int = 1
    pause_s: float = 0.0
    timeout_s: float = 10.0
    same_id: bool = False  # every call carries the request id ``prefix`` (an app reusing one id)
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.streams)]

    def _take(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or self._next >= self.max_calls:
                return None
            self._next += 1
            return self._next - 1

    def _run(self) -> None:
        with KServeClient(f"127.0.0.1:{self.port}") as client:
            while (i := self._take()) is not None:
                self._one(client, i)
                if self.pause_s:
                    time.sleep(self.pause_s)

    def _one(self, client: KServeClient, i: int) -> None:
        start = i * self.batch % len(self.images)
        x = np.take(self.images, range(start, start + self.batch), axis=0, mode="wrap")
        rid, sent = self.prefix if self.same_id else f"{self.prefix}-{i}", time.monotonic()
        try:
            reply = client.infer(self.model, {self.input_name: x}, params=self.params, request_id=rid,
                                 timeout=self.timeout_s)
        except grpc.RpcError as e:
            call = Call(rid, None, e.code().name, sent_at=sent, detail=e.details() or "")
        else:
            p = reply.parameters
            call = Call(rid, (time.monotonic() - sent) * 1000.0, "OK", bool(p.get(AgentResponse.DEGRADED)),
                        str(p.get(AgentResponse.SOURCE, "")), sent, version=reply.model_version)
        with self._lock:
            self.calls.append(call)

    @property
    def done(self) -> int:
        return len(self.calls)

    def wait_done(self, n: int, timeout_s: float = 60.0) -> bool:
        return wait_until(lambda: self.done >= n, timeout_s)

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> Load:
        self._stop.set()
        return self.join()

    def join(self) -> Load:
        for t in self._threads:
            t.join(self.timeout_s + 30)
        return self

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- figures --
    def answered_ids(self) -> set[str]:
        return {c.request_id for c in self.calls if c.code == "OK"}

    def errors(self) -> dict[str, int]:
        return dict(Counter(c.code for c in self.calls if c.code != "OK"))

    def record(self, outcome: Outcome, deadline_ms: float | None = None) -> None:
        """Answered, failed, degraded and p99 of this load into ``outcome``."""
        ms = [c.ms for c in self.calls if c.ms is not None]
        outcome.answered = len(ms)
        outcome.failed = len(self.calls) - len(ms)
        outcome.degraded = sum(c.degraded for c in self.calls)
        outcome.p99_ms = latency_summary(np.asarray(ms, dtype=float))["p99_ms"]
        outcome.deadline_ms = deadline_ms
        if outcome.failed:
            outcome.figures["errors"] = self.errors()


def escalate(mode: str) -> dict[str, str]:
    return {str(AgentRequest.ESCALATE): mode}
