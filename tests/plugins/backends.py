"""A user-supplied backend (named by dotted path) whose every call can be slowed or hung from outside.

The delay in seconds is read, per call, from the file named by $EDGECLOUD_TEST_DELAY_FILE, so a test
can make a running agent's inference hang (watchdog) or take a while (drain on SIGTERM).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from edgecloud.backends.ort_session import OrtBackend


class SlowOrtBackend(OrtBackend):
    def infer(self, inputs):
        path = Path(os.environ.get("EDGECLOUD_TEST_DELAY_FILE", "/nonexistent"))
        if path.exists():
            time.sleep(float(path.read_text() or 0))
        return super().infer(inputs)
