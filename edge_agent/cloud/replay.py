"""Replays spooled cases to the cloud in the background, oldest first, once the cloud answers again."""

from __future__ import annotations

import logging
import threading

from edge_agent.cloud.link import CloudError, CloudLink
from edge_agent.cloud.spool import Spool
from edge_agent.serving.slot import ModelSlot

log = logging.getLogger(__name__)


class Replayer:
    """A daemon thread; each round sends cases until one fails (the cloud is still away) or none is left."""

    def __init__(self, spool: Spool, link: CloudLink, slot: ModelSlot, interval_s: float = 2.0,
                 timeout_s: float = 5.0) -> None:
        self.spool, self.link, self.slot = spool, link, slot
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.replayed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-replay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def replay_once(self) -> int:
        """Send what can be sent now; returns how many cases the cloud took."""
        sent = 0
        while not self._stop.is_set():
            item = self.spool.oldest()
            if item is None:
                break
            key, request = item
            try:
                self.link.ask(self.slot.model, request, self.timeout_s)
            except CloudError as e:
                log.debug("event=replay_paused error=%r depth=%d", str(e), self.spool.depth())
                break
            self.spool.remove(key)
            sent += 1
            self.replayed += 1  # counted as it leaves the spool: a reader never sees it gone and uncounted
            log.info("event=replayed request_id=%s rows=%d", request.id,
                     next(iter(request.inputs.values())).shape[0])
        return sent

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.replay_once()
            except Exception:  # never let the replay thread die silently
                log.exception("event=replay_error")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.timeout_s + 1)
