"""systemd integration without libsystemd: sd_notify over ``$NOTIFY_SOCKET`` and a watchdog that only
pets systemd while inference really progresses.

A watchdog fed by a bare timer thread proves only that the process is alive. Here each ping is earned:
``Watchdog`` pings (every half ``WATCHDOG_USEC``) only while a ``progress()`` value keeps changing, and
``InferenceProbe`` makes such a value by running a tiny inference in a loop. When the backend hangs, the
probe's counter stops, the pings stop, and systemd restarts the service (``Restart=on-failure``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _socket_address(value: str) -> str | None:
    """``/run/systemd/notify`` as is; ``@name`` is the abstract namespace (a leading NUL byte)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock: and other schemes are not for a service on a device


def notify(*assignments: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``READY=1``, ``STATUS=…``, ``WATCHDOG=1``, ``STOPPING=1``… in one datagram.

    Returns False when not run by systemd (no ``NOTIFY_SOCKET``) or when sending failed; a service must
    keep working either way, so errors are logged, never raised.
    """
    env = os.environ if env is None else env
    target = env.get("NOTIFY_SOCKET", "")
    address = _socket_address(target) if target else None
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(assignments).encode())
    except OSError as e:
        log.warning("event=sd_notify_failed socket=%s error=%r", target, str(e))
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds from ``WATCHDOG_USEC``, or None when systemd expects no pings
    (unset, not positive, or ``WATCHDOG_PID`` names another process)."""
    env = os.environ if env is None else env
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


class Watchdog:
    """A thread that sends ``WATCHDOG=1`` every ``interval_s / 2`` while ``progress()`` keeps changing.

    ``progress`` returns any comparable value that advances with real work (a counter of completed
    probe inferences, a heartbeat timestamp). When it has not changed for ``stall_s`` (default: the
    whole watchdog interval) pings stop, so systemd's timeout fires; they resume if progress does.
    """

    def __init__(self, interval_s: float, progress: Callable[[], object], stall_s: float | None = None,
                 send: Callable[..., bool] = notify) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.stall_s = interval_s if stall_s is None else stall_s
        self._progress = progress
        self._send = send
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0

    def start(self) -> Watchdog:
        self._thread = threading.Thread(target=self._loop, name="sd-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop pinging; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read(self) -> object:
        try:
            return self._progress()
        except Exception as e:  # a broken probe is no progress, never a crash of the watchdog
            log.warning("event=watchdog_progress_failed error=%r", str(e))
            return None

    def _loop(self) -> None:
        last, changed_at, stalled = self._read(), time.monotonic(), False
        while not self._stop.is_set():
            value, now = self._read(), time.monotonic()
            if value is not None and value != last:
                last, changed_at = value, now
            if now - changed_at < self.stall_s:
                if stalled:
                    log.info("event=watchdog_resumed")
                    stalled = False
                if self._send("WATCHDOG=1"):
                    self.pings += 1
            elif not stalled:
                stalled = True
                log.error("event=watchdog_stalled no_progress_s=%.1f action=stop_pinging", now - changed_at)
            self._stop.wait(self.interval_s / 2)


class InferenceProbe:
    """Runs ``infer_once()`` every ``period_s`` on its own thread and counts the completed runs.

    ``count`` is the watchdog's ``progress``: an idle agent still advances it, a hung backend does not
    (the probe goes through the same backend and thread as real calls). A failing run is logged and not
    counted.
    """

    def __init__(self, infer_once: Callable[[], object], period_s: float) -> None:
        self._infer_once = infer_once
        self.period_s = period_s
        self.count = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> InferenceProbe:
        self._thread = threading.Thread(target=self._loop, name="inference-probe", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Stop probing; a probe stuck in a hung backend is left behind (daemon thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def progress(self) -> int:
        return self.count

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._infer_once()
                self.count += 1
            except Exception as e:
                log.warning("event=inference_probe_failed error=%r", str(e))
            self._stop.wait(self.period_s)
