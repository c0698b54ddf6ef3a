"""Which release this device follows, and when it tries it (docs/design.md §7).

- Retained topics say what is desired: the device's own and its group's, each as a topic per model
  (``models/<name>/desired``) and as the one topic every model shares (``model/desired``). A device
  desired release wins over the group's until it is cleared with an empty retained message (the
  device topics are subscribed first, so on connect their retained messages arrive before the
  group's). At one level the later issued of the model's own and the shared one wins, the model's own
  on a tie: a release published by a tool that writes only the shared topic still takes effect. A
  message whose ``issued_at`` cannot be read counts as the later, so it is refused with its reason.
- MQTT handlers only record the newest desired message per topic, and one thread does updates, so a
  burst of releases coalesces into the latest one.
- A device outside a release's rollout share stays put and logs it; that is not a failure. A release
  for the active version is skipped quietly. A release once rolled back is not retried, unless the
  operator publishes it again: the same model, version and file in a new envelope signed later
  (``issued_at`` after the rolled-back copy's, as ``fleet publish`` run again makes).
- With several models (docs/design.md §10) each has a follower of its own on the same topics, and a
  release updates the model it names and no other: a follower takes only the messages that name its
  model (the first model's also takes those naming no served model, to refuse them with a reason).
  A shared topic holding another model's release holds none for this one; the topics per model keep
  each model's release when the next one for another model goes out.
- A desired message is handled once; one that failed for a passing reason (a cut download, an
  internal error) is tried again with exponential backoff, until another message replaces it.
- A new effective desired message while one is being handled cuts its watch window short
  (``Applier.watch_cut``): a rollback takes effect at once, not after ``watch_s``.
- A release with waves (docs/design.md §12) is taken only while this device is inside the current
  wave's share, as the model's signed wave commands say (``waves.py``). A command that widens the share
  lets a release skipped for its share be tried again; a halt of the version serving here rolls it back
  to the model served before (a halt also cuts that version's watch window short), and a later
  ``advancing`` command that includes this device brings it back.

How one release is applied is ``apply.py``'s business.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import NamedTuple

from edge_agent.fleet.link import FleetLink, as_int_version
from edge_agent.serving.slot import ModelSlot
from edge_agent.update.apply import Applier, Stopping
from edge_agent.update.report import Reporter, identity
from edge_agent.update.state import Release
from edge_agent.update.waves import Waves, halted_version
from edgecloud.clock import parse_time
from edgecloud.mqtt.client import ConnectionState, Message
from edgecloud.release import Envelope, Reason, ReleasePayload, ReleaseRejected

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.5
RETRY_MAX_S = 60.0


def _unverified(raw: bytes, key: str) -> str | None:
    """A string field of a desired message's payload, read before it is verified; None without."""
    try:
        value = json.loads(raw)["payload"][key]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def named_model(raw: bytes) -> str | None:
    """The model a desired message names, read before it is verified; None when it names none."""
    return _unverified(raw, "model")


def _issued(raw: bytes) -> datetime:
    """When a desired message says it was issued (unverified). One that does not say is the latest:
    it is then taken and refused with its reason, where it would otherwise hide behind its twin."""
    try:
        return parse_time(_unverified(raw, "issued_at") or "")
    except ValueError:
        return datetime.max.replace(tzinfo=timezone.utc)


class _Retry(NamedTuple):
    """Backoff of a desired message (by hash) whose last try failed for a passing reason."""

    key: str
    attempts: int
    due: float


def _key(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


#: where a desired message comes from, in the order they are subscribed: (scope, per model)
SOURCES = (("device", True), ("device", False), ("group", True), ("group", False))
Source = tuple[str, bool]


class Follower:
    """Follows the desired release topics of one device's model and hands each new release to the
    applier."""

    def __init__(self, fleet: FleetLink, device: str, group: str, model: str, slot: ModelSlot,
                 applier: Applier, reporter: Reporter, stopping: threading.Event,
                 owns: Callable[[str | None], bool] = lambda _model: True) -> None:
        self.fleet = fleet
        self.device = device
        self.group = group
        self.model = model
        self.slot = slot
        self.applier = applier
        self.reporter = reporter
        self._stopping = stopping
        self._owns = owns  # whether a message naming this model (None: naming none) is this follower's
        self._lock = threading.Lock()
        self._desired: dict[Source, bytes | None] = dict.fromkeys(SOURCES)
        self._wake = threading.Event()
        self._settled: set[str] = set()  # desired messages (by hash) handled for good
        self._handling = ""  # hash of the desired message the update thread took last
        self._retry = _Retry("", 0, 0.0)  # of the desired message that failed for a passing reason
        self._outside: set[str] = set()  # settled desired messages skipped for their share, or halted
        self.waves = Waves(device, model, applier.trust, reporter)

    def subscribe(self) -> None:
        """Device topics first; call before the link starts."""
        topics = self.fleet.topics
        for scope, per_model in SOURCES:
            desired = topics.device_desired if scope == "device" else topics.group_desired
            topic = desired(self.device if scope == "device" else self.group, self.model if per_model else "")
            self.fleet.on(topic, lambda m, source=(scope, per_model): self._on_desired(source, m))
        self.fleet.on(topics.rollout(self.model), self._on_rollout)
        self.fleet.client.add_state_listener(self._connection)

    def wake(self) -> None:
        self._wake.set()

    # -- desired messages (FleetLink's worker thread) ---------------------------------------------------
    def _on_desired(self, source: Source, message: Message) -> None:
        raw = message.payload or None
        where = f"device={self.device} model={self.model} source={source[0]}{'' if source[1] else '_shared'}"
        if raw is not None and not self._owns(named_model(raw)):
            log.debug("event=update_desired_other_model %s", where)
            raw = None
        with self._lock:
            self._desired[source] = raw
            device_set = any(self._desired[s] is not None for s in SOURCES if s[0] == "device")
            effective = self._effective_locked()
            if effective and _key(effective) != self._handling:
                self.applier.watch_cut.set()
        if not message.payload:
            log.info("event=update_desired_cleared %s", where)
        elif raw is not None and raw != effective:
            reason = "device_desired_set" if source[0] == "group" and device_set else "older_than_other_topic"
            log.info("event=update_desired_ignored %s reason=%s", where, reason)
        self._wake.set()

    def _on_rollout(self, message: Message) -> None:
        self.waves.received(message.payload)
        pending = self.applier.state.pending
        if pending is not None and halted_version(message.payload) == pending.release.version:
            self.applier.watch_cut.set()  # a halt of the version being watched takes effect at once
        self._wake.set()

    def _connection(self, state: ConnectionState, _detail: str) -> None:  # paho's thread: no blocking
        if state is ConnectionState.CONNECTED:
            self._wake.set()  # a report kept while the broker was away goes out now

    def _effective_locked(self) -> bytes | None:
        for scope in ("device", "group"):
            own, shared = self._desired[(scope, True)], self._desired[(scope, False)]
            if own and shared:
                return own if _issued(own) >= _issued(shared) else shared
            if own or shared:
                return own or shared
        return None

    def _take(self) -> tuple[bytes | None, str]:
        """The effective desired message and its hash, now the one handled (a later one cuts its watch)."""
        with self._lock:
            raw = self._effective_locked()
            self._handling = _key(raw) if raw else ""
            self.applier.watch_cut.clear()
            return raw, self._handling

    # -- the update thread ------------------------------------------------------------------------------
    def run(self) -> None:
        """Until the agent stops: the effective desired message, each new one tried once, a failed one
        again after its backoff."""
        while not self._stopping.is_set():
            self._wake.clear()
            self.reporter.flush()
            raw, key = self._take()
            self._follow_waves(raw, key)
            if not raw or key in self._settled:
                self._wake.wait()
                continue
            retry = self._retry if self._retry.key == key else _Retry(key, 0, 0.0)
            if (wait := retry.due - time.monotonic()) > 0:
                self._wake.wait(wait)
                continue
            if self._handle(raw):
                delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** retry.attempts)
                self._retry = _Retry(key, retry.attempts + 1, time.monotonic() + delay)
                log.info("event=update_retry_scheduled device=%s in_s=%.1f attempt=%d", self.device, delay,
                         self._retry.attempts)
            elif not self._stopping.is_set():
                self._settled.add(key)

    def _follow_waves(self, raw: bytes | None, key: str) -> None:
        """Take a new wave command: roll back a halted version serving here, and let a release skipped
        for its share (or halted) be tried again under the new share."""
        command = self.waves.take(lambda: self._held(raw))
        if command is None:
            return
        if command.state == "halted" and self.applier.halt(command):
            self._outside.add(key)
        self._settled -= self._outside
        self._outside.clear()

    def _held(self, raw: bytes | None) -> list[ReleasePayload]:
        """The verified releases this device holds: the effective desired one and the one serving."""
        held = []
        if raw:
            with contextlib.suppress(ReleaseRejected):  # refused with its reason when it is handled
                held.append(self.applier.verify(Envelope.from_json(raw)))
        active = self.applier.state.active
        if active is not None:
            try:
                held.append(ReleasePayload.from_dict(active.release))
            except ReleaseRejected:  # verified when it was applied; a newer schema may not parse here
                log.debug("event=update_active_release_unreadable device=%s", self.device)
        return held

    def _handle(self, raw: bytes) -> bool:
        """Handle one desired message; True when it failed for a passing reason (retry later)."""
        ident = None
        try:
            envelope = Envelope.from_json(raw)
            ident = identity(envelope.payload)
            payload = self.applier.verify(envelope)
            if self._wanted(payload, _key(raw)):
                self.applier.apply(envelope, payload)
            return False
        except Stopping:
            log.info("event=update_abandoned device=%s reason=stopping", self.device)
            return False
        except ReleaseRejected as e:
            self.applier.refused(ident, e.reason.value, e.detail)
            return e.reason is Reason.DOWNLOAD_FAILED
        except Exception as e:  # a bug or the disk: keep serving, say so, try again later
            log.exception("event=update_error device=%s", self.device)
            self.applier.refused(ident, "internal", f"{type(e).__name__}: {e}")
            return True

    def _wanted(self, payload: ReleasePayload, key: str) -> bool:
        """False for a verified release this device skips quietly: outside its rollout share (the
        current wave's), rolled back before, or the version already active."""
        where = f"device={self.device} model={payload.model} version={payload.version}"
        if not self.waves.admits(payload):
            self._outside.add(key)
            log.info("event=update_not_in_rollout %s percent=%g salt=%s", where, self.waves.share(payload),
                     payload.rollout.salt)
            return False
        release = Release(payload.model, payload.version, payload.artifact.sha256)
        if self.applier.state.rolled_back_before(release, payload.issued_at):
            log.info("event=update_skipped %s reason=rolled_back_before hint='publish it again to retry'",
                     where)
            return False
        if payload.version == as_int_version(self.slot.model.version):
            log.info("event=update_skipped %s reason=active_version", where)
            return False
        return True
