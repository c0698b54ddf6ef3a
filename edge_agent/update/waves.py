"""The wave commands of one model's rollout, as this device takes them (docs/design.md §12).

The retained ``models/<name>/rollout`` topic holds the newest signed command for the model. A command is
taken once it verifies against a release this device holds (the desired one or the one it serves)
with a key trusted for that release, names a wave inside its signed plan and is not older than the
last command taken for that version; anything else is refused once, with its reason, in a
``rollout.command_refused`` event, and the device keeps what it serves. A command for a version the
device does not hold yet is kept and tried again when a release arrives (retained messages of
different topics come in any order).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable

from edge_agent.update.report import Reporter, one_line
from edgecloud.release import Envelope, ReleasePayload, ReleaseRejected, in_rollout
from edgecloud.rollout import CommandReason, CommandRefused, WaveCommand, share, verify_command
from edgecloud.signing import TrustStore

log = logging.getLogger(__name__)


def halted_version(raw: bytes) -> int | None:
    """The version a command halts, read before it is verified (to cut a watch window short); None for
    any other command."""
    try:
        payload = json.loads(raw)["payload"]
        version = payload["version"]
    except (ValueError, KeyError, TypeError):
        return None
    return version if payload.get("state") == "halted" and isinstance(version, int) else None


class Waves:
    """The newest command received and the commands taken, per release version."""

    def __init__(self, device: str, model: str, trust: TrustStore, reporter: Reporter) -> None:
        self.device = device
        self.model = model
        self.trust = trust
        self.reporter = reporter
        self._lock = threading.Lock()
        self._raw: bytes | None = None
        self._tried = ""  # hash of the newest command once taken or refused for good
        self._waiting = ""  # hash of the newest command while its release is not held (said once)
        self.taken: dict[int, WaveCommand] = {}

    def received(self, raw: bytes | None) -> None:
        """A retained command arrived (None: cleared); MQTT worker thread."""
        with self._lock:
            self._raw = raw or None

    def take(self, held: Callable[[], Iterable[ReleasePayload]]) -> WaveCommand | None:
        """Verify the newest command against the releases held (read only when there is a command to
        verify); the command when it is newly taken,
        None when there is nothing new (or it was refused, or waits for its release)."""
        with self._lock:
            raw = self._raw
        if raw is None:
            return None
        key = hashlib.sha256(raw).hexdigest()
        if key == self._tried:
            return None
        version = None
        try:
            envelope = Envelope.from_json(raw)
            version = WaveCommand.from_dict(dict(envelope.payload)).version  # malformed before unknown
            release = next((r for r in held() if r.model == self.model and r.version == version), None)
            if release is None:  # tried again when a release arrives
                raise CommandRefused(CommandReason.UNKNOWN_VERSION, f"no release of {self.model} version "
                                     f"{version!r} is held here")
            command = verify_command(envelope, release, self.trust, self.taken.get(release.version))
        except (CommandRefused, ReleaseRejected) as e:
            waits = isinstance(e, CommandRefused) and e.reason is CommandReason.UNKNOWN_VERSION
            if waits and self._waiting == key:
                return None
            self._waiting, self._tried = (key, self._tried) if waits else ("", key)
            code = e.reason.value if isinstance(e, CommandRefused) else CommandReason.MALFORMED.value
            log.warning("event=rollout_command_refused device=%s model=%s version=%s reason=%s detail=%r",
                        self.device, self.model, version, code, e.detail)
            self.reporter.event("rollout.command_refused", "warning", model=self.model,
                                version=version if isinstance(version, int) else None, reason=code,
                                detail=one_line(e.detail))
            return None
        self._tried = key
        self.taken[command.version] = command
        log.info("event=rollout_command_taken device=%s model=%s version=%d wave=%d state=%s reason=%r",
                 self.device, self.model, command.version, command.wave, command.state, command.reason)
        return command

    def share(self, release: ReleasePayload) -> float:
        """The percent of the fleet inside ``release``'s rollout now."""
        return share(release, self.taken.get(release.version))

    def admits(self, release: ReleasePayload) -> bool:
        """Whether this device is inside ``release``'s share now (docs/design.md §6 at its wave's percent)."""
        return in_rollout(self.device, self.share(release), release.rollout.salt)
