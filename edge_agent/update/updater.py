"""The agent's update path (docs/design.md §7), composed: follow the signed release desired for this device
(or else for its group) and move to it without ever failing a call, or refuse it with a reason.

States reported on ``model/reported`` (retained), each change also an ``update.state`` event::

    desired ─ verify ─ rollout and skips ─ checks ─ downloading (progress) ─ verifying ─ staged ─ active
            ─ watch window ─┬─ passed: stays active, previous slot kept
                            └─ regression, or a restart inside it: rolled_back (reason)
    any refusal ─ failed (reason): the active model keeps serving

Where each part lives:

- ``follow.py``: which desired message counts (device over group), rollout and skips, retries;
- ``apply.py``: one release from verification to the swap and the watch window's verdict;
- ``report.py``: the retained report and the update events;
- ``startup.py``: what to serve after a restart (a crash inside the watch window rolls back);
- ``state.py``, ``staging.py``, ``watch.py``, ``faults.py``: the persisted state, the second slot's
  file and self-test, the watch window's figures, the crash-test fault points.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

from edge_agent.config import AgentConfig
from edge_agent.fleet.link import FleetLink
from edge_agent.serving.slot import ModelSlot
from edge_agent.update.apply import Applier
from edge_agent.update.faults import FaultPoints
from edge_agent.update.follow import Follower
from edge_agent.update.report import Reporter
from edge_agent.update.startup import Startup, announce_startup
from edgecloud.clock import utc_now

log = logging.getLogger(__name__)

STOP_JOIN_S = 10.0


class Updater:
    """The update path of one device on its own thread: a follower that hands releases to an applier,
    both reporting through one reporter."""

    def __init__(self, config: AgentConfig, slot: ModelSlot, fleet: FleetLink, startup: Startup,
                 clock: Callable[[], datetime] = utc_now,
                 owns: Callable[[str | None], bool] = lambda _model: True) -> None:
        """``owns``: whether a desired message naming a model (None: naming none) is for this updater
        (``follow.py``); every message is, with one model."""
        self.device = config.agent.device_id
        self._startup = startup
        self._stopping = threading.Event()
        self.reporter = Reporter(fleet, self.device, slot)
        self.applier = Applier(config, slot, startup.store, startup.state, self.reporter,
                               FaultPoints(self.device), self._stopping, clock)
        self.follower = Follower(fleet, self.device, config.fleet.group, slot.model.name, slot,
                                 self.applier, self.reporter, self._stopping, owns)
        self._thread = threading.Thread(target=self._run, name=f"updater-{slot.model.name}", daemon=True)

    @property
    def clock(self) -> Callable[[], datetime]:
        """What release times are checked against (a device may start with its clock unset)."""
        return self.applier.clock

    @clock.setter
    def clock(self, clock: Callable[[], datetime]) -> None:
        self.applier.clock = clock

    def start(self) -> Updater:
        """Subscribe (device topic first) and start the update thread; call before the link starts."""
        self.follower.subscribe()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Abandon any update in progress (its state stays persisted) and close replaced models."""
        self._stopping.set()
        self.applier.watch_cut.set()
        self.follower.wake()
        if self._thread.is_alive():
            self._thread.join(STOP_JOIN_S)
            if self._thread.is_alive():
                log.warning("event=updater_stop_timeout device=%s", self.device)
        self.applier.close_retired()

    def _run(self) -> None:
        announce_startup(self._startup, self.reporter)
        self.follower.run()
