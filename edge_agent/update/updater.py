"""The agent's updater (DESIGN §6): follow the signed release desired for this device (or else for its
group), and move to it without ever failing a call, or refuse it with a reason.

States reported on ``model/reported`` (retained), each change also an ``update.state`` event::

    desired ─ verify (key, signature, expiry) ─ rollout ─ version, name, size, target
            ─ downloading (progress, resumable) ─ verifying ─ load + self-test in a second slot
            ─ staged ─ swap ─ active ─ watch window ─┬─ passed: stays active, previous slot kept
                                                      └─ regression or restart: rolled_back (reason)
    any refusal ─ failed (reason): the active model keeps serving

Rules of thumb behind the choices:

- One thread does updates; MQTT handlers only record the newest desired message per topic, so a burst
  of releases coalesces into the latest one. A device desired release wins over the group's until it
  is cleared with an empty retained message (the device topic is subscribed first, so on connect its
  retained message arrives before the group's).
- A device outside a release's rollout share stays put and logs it; that is not a failure. A release
  for the active version is skipped quietly. A release once rolled back is never retried: publish a
  new version.
- Checks that need no file (name, size, TensorRT target, URI) run before any byte is downloaded. A
  download cut short (``download_failed``) is retried with backoff and resumes from its partial file.
- The new model must have the serving contract: the same model name and identical inputs and outputs
  (``contract_mismatch``), and give finite outputs of the right shapes on ``self_test_rows`` rows of
  zeros and of random data (``unloadable``); see ``staging.py``, which also builds the TensorRT engine
  of an ONNX release on a Jetson.
- The swap is one reference change in the ModelSlot: calls in flight finish on the model they began
  with, and the replaced model is closed only when the next update starts (or at stop), long after
  the watch window. The window judges the new model against the previous one (see ``watch.py``);
  a restart inside the window counts as a crash loop and rolls back at start.
- Downloads authenticate like escalations: the cloud's TLS settings and bearer token.

Fault points for crash tests: with ``EDGECLOUD_FAULT=after:<step>`` the agent SIGKILLs itself right
after ``downloading`` (the first chunk is on disk), ``verifying`` (the file is complete and verified),
``staged`` (the self-test passed) or ``swapped`` (the new model serves, the watch window has begun).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from edge_agent.config import AgentConfig
from edge_agent.fleet.link import FleetLink, as_int_version
from edge_agent.serving.slot import EdgeModel, ModelSlot, load_edge_model
from edge_agent.update.staging import Runtime, self_test
from edge_agent.update.state import Pending, Release, Slot, StateStore, UpdateState
from edge_agent.update.watch import figures, metered, regression
from edgecloud.artifacts import TransportTLS, check_name, download, file_sha256, parse_uri
from edgecloud.channel import read_token
from edgecloud.engine.builder import BuildOptions, build_engine
from edgecloud.engine.cache import EngineCache
from edgecloud.errors import ModelLoadError
from edgecloud.mqtt.client import ConnectionState, Message, MqttError
from edgecloud.mqtt.payloads import Reported
from edgecloud.release import (
    Artifact,
    Envelope,
    Reason,
    ReleasePayload,
    ReleaseRejected,
    RollbackReason,
    check_size,
    check_version,
    format_time,
    in_rollout,
    parse_time,
    utc_now,
    verify_envelope,
)
from edgecloud.signing import TrustStore

log = logging.getLogger(__name__)

FAULT_ENV = "EDGECLOUD_FAULT"
FAULT_STEPS = ("downloading", "verifying", "staged", "swapped")
RETRY_MIN_S = 0.5
RETRY_MAX_S = 60.0
STOP_JOIN_S = 10.0
CONNECT_WAIT_S = 10.0
REASON_MAX_CHARS = 400


class _Stopping(Exception):
    """The agent is stopping: abandon the update where it stands."""


class _Retry(NamedTuple):
    """Backoff of a desired message (by hash) whose last try failed for a passing reason."""

    key: str
    attempts: int
    due: float


# -- what to serve at start ------------------------------------------------------------------------------
def _named(config: AgentConfig, name: str) -> AgentConfig:
    """``config`` serving the model under ``name`` (a slot file is called ``model.onnx``)."""
    return config.model_copy(update={"model": config.model.model_copy(update={"name": name})})


def load_slot(config: AgentConfig, store: StateStore, slot: Slot) -> EdgeModel:
    """Load a slot's file with its release's calibration and labels."""
    path = store.absolute(slot)
    if not path.is_file():
        raise ModelLoadError(f"slot file {path} is missing")
    return load_edge_model(_named(config, slot.model), path, str(slot.version), slot.release)


@dataclass(frozen=True)
class Startup:
    """The model the agent starts with (metered for a watch window in a fleet), the state it came from, and
    what to tell the fleet once connected."""

    model: EdgeModel
    store: StateStore
    state: UpdateState
    rolled_back: Release | None = None  # restarted inside this release's watch window
    corrupt: str | None = None


def load_startup(config: AgentConfig) -> Startup:
    """The last good model: the state's active slot (its previous one after a restart inside a watch
    window, or when the active file does not load), else the configured model."""
    store = StateStore(config.agent.state_dir)
    loaded, corrupt = store.load()
    state, crashed = loaded, None
    if state.pending and state.pending.step == "watching":
        crashed = state.pending.release
        state = replace(state.with_rolled_back(crashed), active=state.previous, previous=None, pending=None)
        log.error("event=update_crash_loop model=%s version=%d action=roll_back", crashed.model,
                  crashed.version)
    elif state.pending:  # the retained desired release starts it again (a download resumes)
        log.info("event=update_interrupted model=%s version=%d step=%s", state.pending.release.model,
                 state.pending.release.version, state.pending.step)
        state = replace(state, pending=None)
    model, served = None, None
    for slot in (state.active, state.previous):
        if slot is None:
            continue
        try:
            model, served = load_slot(config, store, slot), slot
            break
        except Exception as e:  # ModelLoadError, or a runtime's own error during warm-up: try the next
            log.error("event=slot_unloadable version=%d path=%s error=%r", slot.version, slot.path, str(e))
    if served is not state.active:
        state = replace(state, active=served, previous=None)
    if state != loaded:
        store.save(state)
    if model is None:
        model = load_edge_model(config)
    log.info("event=update_state_restored active=%s previous=%s serving_version=%s",
             state.active.version if state.active else "config",
             state.previous.version if state.previous else "config", model.version)
    if config.fleet.name:  # only a fleet member gets releases to watch
        model = metered(model)
    return Startup(model, store, state, crashed, corrupt)


def _one_line(text: str) -> str:
    """Runtime errors span lines; a reason is one line of bounded length."""
    return " ".join(str(text).split())[:REASON_MAX_CHARS]


def _identity(payload: Mapping[str, Any]) -> tuple[str, int] | None:
    """Model and version of a release not (yet) verified, when it names them well enough to report."""
    model, version = payload.get("model"), payload.get("version")
    named = isinstance(model, str) and bool(model)
    numbered = isinstance(version, int) and not isinstance(version, bool) and version >= 0
    return (model, version) if named and numbered else None


# -- the updater ------------------------------------------------------------------------------------------
class Updater:
    """Follows the desired release topics of one device and applies releases on its own thread."""

    def __init__(self, config: AgentConfig, slot: ModelSlot, fleet: FleetLink, startup: Startup,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.config = config
        self.slot = slot
        self.fleet = fleet
        self.device = config.agent.device_id
        self.store = startup.store
        self.state = startup.state
        self.clock = clock
        self.trust = TrustStore.from_files(config.fleet.trusted_keys, config.fleet.revoked_keys)
        self.runtime = Runtime.detect(config, slot.model.path)
        self.engines = EngineCache(self.store.root / "engines")
        self._startup = startup
        self._fault_at = os.environ.get(FAULT_ENV, "")
        if self._fault_at and self._fault_at.removeprefix("after:") not in FAULT_STEPS:
            log.warning("event=fault_unknown %s=%s steps=%s", FAULT_ENV, self._fault_at,
                        ",".join(FAULT_STEPS))
        self._lock = threading.Lock()
        self._desired: dict[str, bytes | None] = {"device": None, "group": None}
        self._wake = threading.Event()
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._settled: set[str] = set()  # desired messages (by hash) handled for good
        self._retry = _Retry("", 0, 0.0)  # of the desired message that failed for a passing reason
        self._unsent: Reported | None = None  # the latest report, until the broker has it
        self._retired: list[EdgeModel] = []  # replaced models, closed at the next update or at stop
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)

    def start(self) -> Updater:
        """Subscribe (device topic first) and start the update thread; call before the link starts."""
        topics = self.fleet.topics
        self.fleet.on(topics.device_desired(self.device), lambda m: self._on_desired("device", m))
        self.fleet.on(topics.group_desired(self.config.fleet.group), lambda m: self._on_desired("group", m))
        self.fleet.client.add_state_listener(self._connection)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Abandon any update in progress (its state stays persisted) and close replaced models."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(STOP_JOIN_S)
            if self._thread.is_alive():
                log.warning("event=updater_stop_timeout device=%s", self.device)
        self._close_retired()

    # -- desired messages (FleetLink's worker thread) ---------------------------------------------------
    def _on_desired(self, source: str, message: Message) -> None:
        with self._lock:
            self._desired[source] = message.payload or None
            device_set = self._desired["device"] is not None
        if not message.payload:
            log.info("event=update_desired_cleared device=%s source=%s", self.device, source)
        elif source == "group" and device_set:
            log.info("event=update_group_ignored device=%s reason=device_desired_set", self.device)
        self._wake.set()

    def _connection(self, state: ConnectionState, _detail: str) -> None:  # paho's thread: no blocking
        if state is ConnectionState.CONNECTED:
            self._connected.set()
            self._wake.set()  # a report kept while the broker was away goes out now
        else:
            self._connected.clear()

    def _effective(self) -> bytes | None:
        with self._lock:
            return self._desired["device"] or self._desired["group"]

    # -- the update thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        self._announce_startup()
        while not self._stopping.is_set():
            self._wake.clear()
            self._flush()
            raw = self._effective()
            key = hashlib.sha256(raw).hexdigest() if raw else ""
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

    def _announce_startup(self) -> None:
        startup = self._startup
        if startup.rolled_back is None and startup.corrupt is None:
            return
        if not self._connected.wait(CONNECT_WAIT_S):  # the report waits in _unsent; events are best effort
            log.warning("event=update_startup_not_announced device=%s reason=not_connected", self.device)
        if startup.corrupt:
            self.fleet.event("update.state_corrupt", "error", detail=startup.corrupt)
        if startup.rolled_back:
            release = startup.rolled_back
            self._enter(release.model, release.version, "rolled_back",
                        reason=f"{RollbackReason.CRASH_LOOP.value}: restarted during the watch window")

    def _handle(self, raw: bytes) -> bool:
        """Handle one desired message; True when it failed for a passing reason (retry later)."""
        ident = None
        try:
            envelope = Envelope.from_json(raw)
            ident = _identity(envelope.payload)
            self._apply(envelope)
            return False
        except _Stopping:
            log.info("event=update_abandoned device=%s reason=stopping", self.device)
            return False
        except ReleaseRejected as e:
            self._failed(ident, e.reason.value, e.detail)
            return e.reason is Reason.DOWNLOAD_FAILED
        except Exception as e:  # a bug or the disk: keep serving, say so, try again later
            log.exception("event=update_error device=%s", self.device)
            self._failed(ident, "internal", f"{type(e).__name__}: {e}")
            return True

    def _apply(self, envelope: Envelope) -> None:
        payload = self._verify(envelope)
        if not self._wanted(payload):
            return
        cfg = self.config
        release = Release(payload.model, payload.version, payload.artifact.sha256)
        downloaded = self._download(release, payload.artifact)
        self._step(release, "verifying")
        servable = self.runtime.servable(downloaded, payload.artifact, self.engines, self._build_engine)
        self._close_retired()  # free their memory before a second model loads
        try:
            serving = cfg.model_copy(update={"cascade": self.slot.flags})  # as reloaded since start
            candidate = load_edge_model(_named(serving, payload.model), servable, str(payload.version),
                                        envelope.payload)
        except Exception as e:  # ModelLoadError, or a runtime's own error during warm-up
            raise ReleaseRejected(Reason.UNLOADABLE, f"{servable.name}: {e}") from None
        try:
            self_test(candidate, self.slot.model, cfg.update.self_test_rows)
            self._step(release, "staged")
        except BaseException:
            candidate.backend.close()
            raise
        slot = Slot(payload.version, self.store.relative(servable), envelope.payload)
        self._swap_and_watch(release, metered(candidate), slot)

    def _verify(self, envelope: Envelope) -> ReleasePayload:
        """Key, signature and expiry; remembers the newest ``issued_at`` trusted (the unset-clock rule)."""
        newest = self.state.newest_issued_at
        payload = verify_envelope(envelope, self.trust, self.clock(), self.config.fleet.clock_skew_s,
                                  parse_time(newest) if newest else None)
        if newest is None or parse_time(newest) < payload.issued_at:
            self._save(newest_issued_at=format_time(payload.issued_at))
        return payload

    def _wanted(self, payload: ReleasePayload) -> bool:
        """False for a release to skip quietly; ReleaseRejected for one this device refuses before any
        byte is downloaded."""
        where = f"device={self.device} model={payload.model} version={payload.version}"
        if not in_rollout(self.device, payload.rollout.percent, payload.rollout.salt):
            log.info("event=update_not_in_rollout %s percent=%g salt=%s", where, payload.rollout.percent,
                     payload.rollout.salt)
            return False
        if Release(payload.model, payload.version, payload.artifact.sha256) in self.state.rolled_back:
            log.info("event=update_skipped %s reason=rolled_back_before", where)
            return False
        serving = self.slot.model
        active = as_int_version(serving.version)
        if payload.version == active:
            log.info("event=update_skipped %s reason=active_version", where)
            return False
        check_version(payload.version, active, payload.allow_downgrade)
        try:
            check_name(payload.model)
        except ValueError as e:
            raise ReleaseRejected(Reason.BAD_NAME, str(e)) from None
        if payload.model != serving.name:
            raise ReleaseRejected(Reason.CONTRACT_MISMATCH, f"release is for model {payload.model!r}, "
                                  f"this device serves {serving.name!r}")
        check_size(payload.artifact.size, self.config.model.budget_bytes)
        self.runtime.check(payload.artifact)
        parse_uri(payload.artifact.uri)
        return True

    def _download(self, release: Release, artifact: Artifact) -> Path:
        suffix = ".plan" if artifact.format == "tensorrt-plan" else ".onnx"
        dest = self.store.slot_file(release.model, release.version, suffix)
        self._save(pending=Pending(release, "downloading"))
        if dest.is_file():
            if file_sha256(dest) == artifact.sha256:
                log.info("event=update_download_skipped model=%s version=%d reason=verified_file_present",
                         release.model, release.version)
                return dest
            dest.unlink()
        part = dest.with_name(dest.name + ".part")
        done = part.stat().st_size if part.is_file() else 0
        size = artifact.size
        self._enter(release.model, release.version, "downloading",
                    progress=round(min(done / size, 1.0), 4) if size else 1.0)
        reported = [int(done * 10 / size) if size else 10]

        def progress(done: int, total: int) -> None:
            if self._stopping.is_set():
                raise _Stopping
            self._fault("downloading")
            tenth = int(done * 10 / total) if total else 10
            if tenth > reported[0]:  # every 10 %
                reported[0] = tenth
                self._report(release.model, release.version, "downloading", progress=round(done / total, 4))

        tls, token = self._transport()
        return download(artifact.uri, dest, sha256=artifact.sha256, size=size,
                        budget=self.config.model.budget_bytes,
                        allowed_roots=self.config.fleet.allowed_file_roots, tls=tls, token=token,
                        progress=progress)

    def _transport(self) -> tuple[TransportTLS | None, str | None]:
        cloud = self.config.cloud
        tls = None
        if cloud.tls is not None:
            tls = TransportTLS(cloud.tls.ca, cloud.tls.cert, cloud.tls.key, cloud.tls.server_name)
        token = read_token(cloud.token_file) if cloud.token_file else None
        return tls, token

    def _build_engine(self, onnx: Path, out: Path) -> object:
        options = BuildOptions(budget_bytes=self.config.model.budget_bytes)
        return build_engine(onnx, out, options, device=self.runtime.device)

    def _swap_and_watch(self, release: Release, candidate: EdgeModel, slot: Slot) -> None:
        before = self.state
        self._save(active=slot, previous=before.active, pending=Pending(release, "watching"))
        replaced = self.slot.swap(candidate)
        self._fault("swapped")
        self._enter(release.model, release.version, "active")
        try:
            reason = self._watch(replaced, candidate)
        except _Stopping:  # a clean stop is no verdict: start on the previous model, and the retained
            # desired release applies again (its verified file is kept); only a crash counts against it
            self._save(active=before.active, previous=before.previous, pending=None)
            self._retired.append(replaced)
            raise
        if reason is None:
            self._save(pending=None)
            self._retired.append(replaced)
            log.info("event=update_watch_passed device=%s model=%s version=%d", self.device, release.model,
                     release.version)
            self.fleet.event("update.watch_passed", model=release.model, version=release.version)
        else:
            self.slot.swap(replaced)
            self._save(active=before.active, previous=before.previous, pending=None,
                       rolled_back=self.state.with_rolled_back(release).rolled_back)
            self._retired.append(candidate)
            self._enter(release.model, release.version, "rolled_back", reason=reason)
        self.store.prune(self.state)

    def _watch(self, previous: EdgeModel, new: EdgeModel) -> str | None:
        """Wait out the window, then judge the new model's calls against the previous model's."""
        update = self.config.update
        if self._stopping.wait(update.watch_s):
            raise _Stopping
        before, after = figures(previous), figures(new)
        log.info("event=update_watch_done device=%s version=%s calls=%d errors=%d p50_ms=%s "
                 "previous_calls=%d previous_errors=%d previous_p50_ms=%s", self.device, new.version,
                 after.calls, after.errors, after.p50_ms, before.calls, before.errors, before.p50_ms)
        return regression(before, after, update.max_error_rate, update.max_latency_factor)

    # -- state, reports, faults -------------------------------------------------------------------------
    def _save(self, **changes: Any) -> None:
        self.state = replace(self.state, **changes)
        self.store.save(self.state)

    def _step(self, release: Release, step: str) -> None:
        """A completed step: persisted, reported, and a fault point."""
        if self._stopping.is_set():
            raise _Stopping
        self._save(pending=Pending(release, step))
        self._enter(release.model, release.version, step)
        self._fault(step)

    def _failed(self, ident: tuple[str, int] | None, code: str, detail: str) -> None:
        if self.state.pending is not None:
            self._save(pending=None)
        reason = f"{code}: {_one_line(detail)}"
        if ident is None:  # nothing to name the report after
            log.warning("event=update_rejected device=%s reason=%r", self.device, reason)
            self.fleet.event("update.rejected", "warning", reason=reason)
        else:
            self._enter(*ident, "failed", reason=reason)
        if code != Reason.DOWNLOAD_FAILED.value:
            self.store.prune(self.state)

    def _enter(self, model: str, version: int, state: str, progress: float | None = None,
               reason: str | None = None) -> None:
        """A state change: one log line, one event, one retained report."""
        bad = state in ("failed", "rolled_back")
        log.log(logging.WARNING if bad else logging.INFO,
                "event=update_state device=%s model=%s version=%d state=%s progress=%s reason=%r",
                self.device, model, version, state, progress, reason)
        self.fleet.event("update.state", "warning" if bad else "info", model=model, version=version,
                         state=state, progress=progress, reason=reason,
                         active_version=as_int_version(self.slot.model.version))
        self._report(model, version, state, progress, reason)
        if state in ("active", "rolled_back"):  # the served model changed
            self.fleet.announce()

    def _report(self, model: str, version: int, state: str, progress: float | None = None,
                reason: str | None = None) -> None:
        payload = Reported(device=self.device, model=model, version=version, state=state,
                           active_version=as_int_version(self.slot.model.version),
                           progress=progress, reason=reason)
        with self._lock:
            self._unsent = payload
        self._flush()

    def _flush(self) -> None:
        """Publish the latest report (retained); kept for the next connect when the broker is away."""
        with self._lock:
            payload = self._unsent
        if payload is None:
            return
        try:
            self.fleet.publish(self.fleet.topics.reported(self.device), payload, retain=True)
        except MqttError as e:
            log.warning("event=update_report_not_sent device=%s state=%s error=%r", self.device,
                        payload["state"], str(e))
            return
        with self._lock:
            if self._unsent is payload:
                self._unsent = None

    def _close_retired(self) -> None:
        while self._retired:
            self._retired.pop().backend.close()

    def _fault(self, step: str) -> None:
        if self._fault_at == f"after:{step}":
            log.critical("event=fault_injected device=%s step=%s", self.device, step)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)
