"""Agent cold start: from starting the process to systemd's ``READY=1`` (model loaded and warmed up, the
API serving), and its resident memory then, over a few starts (the median is reported).

``READY=1`` is read as systemd would: the bench binds a unix datagram socket and hands it to the agent
as ``NOTIFY_SOCKET``; a thread notes when each datagram arrives.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
import uuid

from edgecloud_tools.bench.plan import Bench, progress
from edgecloud_tools.rig import servers

READY_TIMEOUT_S = 60.0


class NotifySocket:
    """An abstract unix datagram socket that records when ``READY=1`` first arrives."""

    def __init__(self) -> None:
        self.name = f"@edgecloud-bench-{uuid.uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.name[1:])
        self._sock.settimeout(READY_TIMEOUT_S)
        self.ready_at: float | None = None
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while self.ready_at is None:
            try:
                message = self._sock.recv(4096).decode(errors="replace")
            except (TimeoutError, OSError):
                return
            if "READY=1" in message.split("\n"):
                self.ready_at = time.monotonic()

    def wait(self) -> float:
        self._thread.join(READY_TIMEOUT_S)
        if self.ready_at is None:
            raise RuntimeError(f"the agent sent no READY=1 within {READY_TIMEOUT_S:.0f} s")
        return self.ready_at

    def close(self) -> None:
        self._sock.close()


def cold_start(bench: Bench) -> dict:
    starts = []
    for i in range(bench.plan.cold_starts):
        progress(f"edge agent cold start {i + 1}/{bench.plan.cold_starts}")
        notify = NotifySocket()
        service = servers.agent(bench.workdir, bench.models.edge, f"cold-{i}",
                                env={"NOTIFY_SOCKET": notify.name})
        try:
            started = time.monotonic()
            with service:
                ready_s = notify.wait() - started
                rss = servers.rss_bytes(service.proc.pid)
            starts.append({"ready_s": round(ready_s, 3), "rss_bytes": rss})
        finally:
            notify.close()
    return {"starts": starts, "ready_s": statistics.median(s["ready_s"] for s in starts),
            "rss_bytes": int(statistics.median(s["rss_bytes"] for s in starts))}
