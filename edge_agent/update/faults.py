"""Fault points for crash tests (docs/design.md §7: a power cut at any step restarts on the last good model).

With ``EDGECLOUD_FAULT=after:<step>`` the agent SIGKILLs itself right after ``downloading`` (the first
chunk is on disk), ``verifying`` (the file is complete and verified), ``staged`` (the self-test passed)
or ``swapped`` (the new model serves, the watch window has begun). Tests kill at a named step instead
of sleeping and hoping; without the variable every point is a no-op.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

FAULT_ENV = "EDGECLOUD_FAULT"
FAULT_STEPS = ("downloading", "verifying", "staged", "swapped")


class FaultPoints:
    """The fault point this process was started with (``$EDGECLOUD_FAULT``, read once)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.setting = os.environ.get(FAULT_ENV, "")
        if self.setting and self.setting.removeprefix("after:") not in FAULT_STEPS:
            log.warning("event=fault_unknown %s=%s steps=%s", FAULT_ENV, self.setting, ",".join(FAULT_STEPS))

    def after(self, step: str) -> None:
        """``step`` is done: die here, without any clean-up, when the fault point names it."""
        if self.setting == f"after:{step}":
            log.critical("event=fault_injected device=%s step=%s", self.device, step)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)
