"""The bench's side of the client processes (:mod:`edgecloud_tools.rig.loadgen`): started once, given
one run at a time, started together, their results merged.

Client processes, not threads of the bench: the clients must not share a GIL with the bench or with
each other, and tritonclient cannot be imported beside edgecloud's own stubs.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecloud.backends import open_backend
from edgecloud_tools.rig.loadgen import MAX_CONNECTIONS
from edgecloud_tools.rig.stats import cdf, latency_summary

#: connections per client process in an open loop
OPEN_LOOP_CONNECTIONS = 8
#: images the load cycles through (the demo's held-out split)
DATA = {"split": "test", "n": 64}


@dataclass(frozen=True)
class Target:
    """What the clients call: a server and the request they send it."""

    client: str  # triton | http | bare
    address: str  # 127.0.0.1:PORT
    model: str = ""
    input: dict[str, str] = field(default_factory=dict)  # name, datatype
    params: dict[str, Any] = field(default_factory=dict)
    flags: tuple[str, ...] = ()  # bool response parameters counted when true
    output: str = ""  # sequence runs: the output whose argmax is the answer
    path: str = ""  # http: the request path
    method: str = ""  # bare: the gRPC method
    frames: dict[str, Any] = field(default_factory=dict)  # triton: send JPEG frames {"size", "quality"}

    def spec(self) -> dict:
        return {"client": self.client, "target": self.address, **{k: v for k, v in asdict(self).items()
                                                                  if k not in ("client", "address")}}


@dataclass
class LoadResult:
    """One run, merged over its client processes."""

    ok: int
    issued: int
    errors: dict[str, int]
    flags: dict[str, int]
    latency_ms: np.ndarray
    window_s: float
    top1: list[int | None] = field(default_factory=list)
    flag_rows: list[list[str]] = field(default_factory=list)
    issued_s: float | None = None

    @property
    def per_s(self) -> float:
        return self.ok / self.window_s if self.window_s else 0.0

    def summary(self) -> dict:
        """The JSON-able figures: counts, answered calls per second, latency of the answered ones."""
        return {"ok": self.ok, "errors": self.errors, "flags": self.flags, "per_s": round(self.per_s, 1),
                "window_s": self.window_s, **latency_summary(self.latency_ms), "cdf": cdf(self.latency_ms)}


class ClientPool:
    """``procs`` client processes, each serving one run at a time."""

    def __init__(self, procs: int, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self._procs: list[subprocess.Popen] = []
        self._lines: list[queue.Queue] = []
        for i in range(procs):
            with open(log_dir / f"client-{i}.log", "ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", "edgecloud_tools.rig.loadgen"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_pump, args=(proc, lines), daemon=True).start()
            self._procs.append(proc)
            self._lines.append(lines)

    @property
    def size(self) -> int:
        return len(self._procs)

    def closed(self, target: Target, streams: int, duration_s: float, warmup_s: float,
               timeout_s: float = 10.0, procs: list[int] | None = None) -> LoadResult:
        """``streams`` calls in flight, each sent when the previous one answered."""
        return self.start_closed(target, streams, duration_s, warmup_s, timeout_s, procs).result()

    def start_closed(self, target: Target, streams: int, duration_s: float, warmup_s: float,
                     timeout_s: float = 10.0, procs: list[int] | None = None) -> Run:
        """As :meth:`closed`, returning once the run has started (on the processes ``procs``)."""
        shares = _split(streams, procs or list(range(self.size)))
        specs, offset = {}, 0
        for i, n in shares.items():
            specs[i] = {**target.spec(), "pattern": "closed", "streams": n,
                        "connections": min(n, MAX_CONNECTIONS), "warmup_s": warmup_s,
                        "duration_s": duration_s, "timeout_s": timeout_s,
                        "max_calls": int(duration_s * 20_000) + 1000, "offset": offset, "data": DATA}
            offset += n
        return self._start(specs, duration_s, warmup_s + duration_s + timeout_s)

    def open(self, target: Target, rate: float, duration_s: float, timeout_s: float) -> LoadResult:
        """Calls sent at ``rate`` per second for ``duration_s`` whatever the answers, over every process."""
        procs = list(range(self.size))
        specs = {i: {**target.spec(), "pattern": "open", "rate": rate / len(procs),
                     "connections": OPEN_LOOP_CONNECTIONS, "duration_s": duration_s, "timeout_s": timeout_s,
                     "max_calls": int(rate * duration_s) + 1, "offset": i * 7, "data": DATA}
                 for i in procs}
        return self._start(specs, duration_s, duration_s * 3 + timeout_s).result()

    def sequence(self, target: Target, images: int, timeout_s: float = 10.0) -> LoadResult:
        """The first ``images`` held-out images one at a time, in order, with each answer's top-1 class."""
        spec = {**target.spec(), "pattern": "sequence", "connections": 1, "timeout_s": timeout_s,
                "max_calls": images, "offset": 0, "data": {"split": "test", "n": images}}
        result = self._start({0: spec}, 0.0, images * timeout_s).result()
        result.window_s = float(np.nansum(result.latency_ms)) / 1000.0
        return result

    def _start(self, specs: dict[int, dict], window_s: float, run_timeout_s: float) -> Run:
        for i, spec in specs.items():
            self._send(i, json.dumps(spec))
        replies = {i: self._receive(i, 60.0) for i in specs}
        failed = {i: r.get("error") for i, r in replies.items() if not r.get("ready")}
        ready = [i for i in specs if i not in failed]
        for i in ready:
            self._send(i, "abort" if failed else "go")
        if failed:
            for i in ready:
                self._receive(i, 60.0)  # each answers the abort
            i, error = next(iter(failed.items()))
            raise RuntimeError(f"client process {i} could not start the run: {error}")
        return Run(self, list(specs), window_s, run_timeout_s + 30.0)

    def _send(self, i: int, line: str) -> None:
        stdin = self._procs[i].stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()

    def _receive(self, i: int, timeout_s: float) -> dict:
        try:
            line = self._lines[i].get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"client process {i} did not answer within {timeout_s:.0f} s") from None
        if line is None:
            raise RuntimeError(f"client process {i} exited (exit code {self._procs[i].poll()})")
        return json.loads(line)

    def close(self) -> None:
        for proc in self._procs:
            if proc.stdin:
                proc.stdin.close()
        for proc in self._procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Run:
    """A started run; ``result()`` waits for every process's share and merges them."""

    pool: ClientPool
    procs: list[int]
    window_s: float
    timeout_s: float

    def result(self) -> LoadResult:
        parts = [self.pool._receive(i, self.timeout_s) for i in self.procs]
        failed = [p["error"] for p in parts if "error" in p]
        if failed:
            raise RuntimeError(f"client process failed: {failed[0]}")
        errors, flags = Counter(), Counter()
        for p in parts:
            errors.update(p["errors"])
            flags.update(p["flags"])
        latency = np.array([x for p in parts for x in p["latency_ms"]], dtype=float)
        issued_s = max((p["issued_s"] for p in parts if p["issued_s"] is not None), default=None)
        return LoadResult(ok=sum(p["ok"] for p in parts), issued=sum(p["issued"] for p in parts),
                          errors=dict(errors), flags=dict(flags), latency_ms=latency, window_s=self.window_s,
                          top1=[t for p in parts for t in p["top1"]],
                          flag_rows=[f for p in parts for f in p["flag_rows"]], issued_s=issued_s)


def _split(streams: int, procs: list[int]) -> dict[int, int]:
    """``streams`` spread over ``procs`` as evenly as they go; processes left without one are not used."""
    shares = {i: streams // len(procs) + (k < streams % len(procs)) for k, i in enumerate(procs)}
    return {i: n for i, n in shares.items() if n > 0}


def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)
    lines.put(None)


def model_input(path: Path) -> dict[str, str]:
    backend = open_backend(path)
    try:
        spec = backend.inputs[0]
        return {"name": spec.name, "datatype": spec.datatype}
    finally:
        backend.close()
