"""What one bench run measures and with how much: the counts of a full run and of ``--quick``, and the
context every stage gets (models, client processes, where logs go, how to report progress)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from edgecloud.modelcard import served_name
from edgecloud_tools.output import stderr_line
from edgecloud_tools.rig.clients import ClientPool, Target
from edgecloud_tools.rig.servers import cpu_seconds


@dataclass(frozen=True)
class Plan:
    """Durations and counts; every load loop is bounded by them."""

    quick: bool
    duration_s: float  # timed part of one closed-loop point
    warmup_s: float  # untimed start of one closed-loop point
    open_duration_s: float  # one open-loop rate
    concurrency: tuple[int, ...]  # closed-loop clients against the agent, its floors and peers
    streams: tuple[int, ...]  # concurrent single-row streams against the gateway
    in_process_calls: int  # timed calls of the in-process backend
    cascade_images: int  # held-out images per mode behind the emulated WAN
    slow_cloud_s: float  # edge-only measurement, with and without the escalating load
    cold_starts: int  # agent starts timed to READY
    frames: int  # 640x480 JPEG frames decoded in process, and escalated per mode
    make_peers: bool  # make a missing peer's venv (else: "not installed")


FULL = Plan(quick=False, duration_s=4.0, warmup_s=1.0, open_duration_s=6.0, concurrency=(1, 4, 16, 64),
            streams=(1, 16, 64, 256), in_process_calls=2000, cascade_images=500, slow_cloud_s=6.0,
            cold_starts=3, frames=300, make_peers=True)
QUICK = Plan(quick=True, duration_s=0.5, warmup_s=0.2, open_duration_s=0.8, concurrency=(1, 16),
             streams=(1, 64), in_process_calls=200, cascade_images=40, slow_cloud_s=1.0, cold_starts=1,
             frames=8, make_peers=False)

#: the rates of the open loop, as multiples of the agent's measured capacity
OPEN_LOOP_FACTORS = (1.5, 3.0)
#: the slow cloud's added round trip, and the escalating clients beside the edge-only one
SLOW_CLOUD_MS = 250.0
ESCALATING_CLIENTS = 16
#: the clients of the CPU-per-call figures (the throughput targets' concurrency)
CPU_STREAMS = 16
#: the emulated WAN of the cascade comparison (the demo's)
WAN_MS = 30.0


@dataclass(frozen=True)
class Models:
    edge: Path  # the agent's INT8 model
    edge_fp32: Path
    cloud: Path  # the gateway's model file
    repository: Path  # the gateway's repository holding it

    @property
    def edge_name(self) -> str:
        return served_name(self.edge)


@dataclass
class Bench:
    """What every stage gets."""

    plan: Plan
    models: Models
    workdir: Path
    pool: ClientPool
    peers_root: Path
    input: dict[str, str]  # the edge (and cloud) model's input: name, datatype

    def target(self, client: str, port: int, model: str = "", **fields) -> Target:
        return Target(client, f"127.0.0.1:{port}", model=model, **{"input": self.input, **fields})

    def closed(self, target: Target, streams: int):
        return self.pool.closed(target, streams, self.plan.duration_s, self.plan.warmup_s)

    def cpu_per_call(self, target: Target, pid: int, streams: int = CPU_STREAMS) -> float | None:
        """Microseconds of CPU the server ``pid`` spends per answered call, over a closed loop of
        ``streams`` with no warm-up, so that every call made is counted."""
        before = cpu_seconds(pid)
        result = self.pool.closed(target, streams, self.plan.duration_s, 0.0)
        used = cpu_seconds(pid) - before
        return round(used / result.ok * 1e6, 1) if result.ok else None


def progress(message: str) -> None:
    """One line per stage on stderr, with the wall-clock time."""
    stderr_line(f"  bench {time.strftime('%H:%M:%S')} {message}")
