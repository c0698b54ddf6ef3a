"""One simulated device of ``edgecloud fleet simulate``: an MQTT v5 session (aiomqtt, so a thousand of
them share one asyncio loop) that does on the fleet's topics what the agent does for the parts a
rollout relies on (docs/design.md §6-§8, §12), with no model file behind it:

- retained ``status``: online on every connect, offline as the Last Will and, published explicitly,
  when the device drops (a flaky one) or the simulation stops;
- the retained desired topics, device before group, each model's own (``models/<name>/desired``) and
  the shared one (``model/desired``), chosen as the agent chooses (``edge_agent/update/follow.py``);
  every release verified with :func:`edgecloud.release.verify_envelope` against the trusted keys, a
  refusal reported ``failed`` with its reason once;
- the retained wave command of the model (``models/<name>/rollout``), checked with
  :func:`edgecloud.rollout.verify_command` against the release it drives (the desired one or the one
  serving): a release is taken only while the device is inside the current share
  (:func:`edgecloud.rollout.share`, :func:`edgecloud.release.in_rollout`); on ``halted`` (a share of 0)
  a device serving that version goes back to the one it served before and reports ``rolled_back`` with
  reason ``rollout_halted`` (on its return, for a device that was offline), and a
  later ``advancing`` that includes it brings it back. A refused command is logged and sent as a
  ``rollout.command_refused`` event, once (as ``edge_agent/update/waves.py`` does);
- ``models/<name>/reported`` and the shared ``model/reported`` through downloading → verifying →
  staged → active, a configurable pause per step (nothing is downloaded);
- telemetry every interval while connected (:mod:`edgecloud_tools.fleet.sim_telemetry`). A device that
  is offline sends none (it is taken as powered down, not as buffering).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import aiomqtt
import numpy as np

from edge_agent.update.follow import SOURCES, Source, named_model
from edge_agent.update.report import identity
from edgecloud import __version__
from edgecloud.clock import parse_time
from edgecloud.mqtt.client import encode_payload
from edgecloud.mqtt.payloads import Body, Event, Reported, ServedModel, Status
from edgecloud.mqtt.topics import FleetTopics, Topic
from edgecloud.release import (
    Envelope,
    ReleasePayload,
    ReleaseRejected,
    check_version,
    in_rollout,
    verify_envelope,
)
from edgecloud.rollout import (
    ROLLOUT_HALTED,
    CommandReason,
    CommandRefused,
    WaveCommand,
    share,
    verify_command,
)
from edgecloud.signing import TrustStore
from edgecloud_tools.fleet.sim_telemetry import DeviceDraws, DeviceTelemetry, Truth

log = logging.getLogger(__name__)

#: what a simulated device says it runs, so fleet tools can tell it from an agent
AGENT_VERSION = f"{__version__}+sim"
PUBLISH_TIMEOUT_S = 10.0
RECONNECT_S = 1.0


@dataclass(frozen=True)
class DeviceSettings:
    """What every device of one simulation shares."""

    host: str
    port: int
    topics: FleetTopics
    group: str
    model: str
    trust: TrustStore
    truth: Truth
    interval_s: float = 5.0
    step_s: float = 0.2  # each update step (downloading, verifying, staged) takes this long
    keepalive_s: int = 30
    flaky_up_s: float = 60.0  # a flaky device stays connected this long on average…
    flaky_down_s: float = 10.0  # …and away this long
    rows_per_s: float = 20.0
    audit_rate: float = 0.02
    device_spread: float = 0.02


@dataclass(frozen=True)
class Desired:
    """A desired message as this device read it: the release, or why it is refused."""

    key: str  # sha256 of the message
    payload: ReleasePayload | None
    refusal: ReleaseRejected | None
    issued_at: datetime
    ident: tuple[str, int] | None = None  # model and version a refused release names, when it does


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _unverified_issued(envelope: Envelope | None) -> datetime:
    """When a refused release says it was issued; one that does not say is the latest (follow.py)."""
    try:
        return parse_time(str(envelope.payload["issued_at"])) if envelope else datetime.max
    except (KeyError, ValueError):
        return datetime.max.replace(tzinfo=timezone.utc)


@dataclass
class SimDevice:
    """One device; :meth:`run` keeps its session (and, for a flaky one, drops and resumes it) until
    ``stop`` is set."""

    device: str
    settings: DeviceSettings
    rng: np.random.Generator
    active: int | None
    flaky: bool = False
    #: the version served before the active one, and its release (None for the initial version)
    previous: tuple[int | None, ReleasePayload | None] | None = None
    telemetry: DeviceTelemetry = field(init=False)
    _client: aiomqtt.Client | None = field(default=None, init=False)
    _desired: dict[Source, Desired | None] = field(default_factory=lambda: dict.fromkeys(SOURCES), init=False)
    _command_raw: bytes = field(default=b"", init=False)
    _commands: dict[int, WaveCommand] = field(default_factory=dict, init=False)  # last taken, by version
    _tried: str = field(default="", init=False)  # key of the newest command once taken or refused for good
    _waiting: str = field(default="", init=False)  # key of the newest command while its release is not held
    _active_release: ReleasePayload | None = field(default=None, init=False)
    _settled: set[str] = field(default_factory=set, init=False)  # desired keys failed for good
    _unsent: dict[str, bytes] = field(default_factory=dict, init=False)  # retained reports, by topic
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.telemetry = DeviceTelemetry(self.device, s.model, DeviceDraws(
            self.rng, s.device_spread, s.rows_per_s, s.audit_rate), s.truth)

    @property
    def connected(self) -> bool:
        return self._client is not None

    # -- the session --------------------------------------------------------------------------------------
    def status(self, state: str) -> Status:
        return Status(device=self.device, state=state, agent_version=AGENT_VERSION, model=self.settings.model,
                      active_version=self.active, group=self.settings.group,
                      models=(ServedModel(name=self.settings.model, active_version=self.active, ready=True),))

    def _subscriptions(self) -> list[tuple[str, int]]:
        """Device desired topics before the group's (their retained messages come first), then the
        model's wave commands."""
        t, s = self.settings.topics, self.settings
        desired = [(t.device_desired if scope == "device" else t.group_desired)(
            self.device if scope == "device" else s.group, s.model if own else "") for scope, own in SOURCES]
        return [(str(topic), 1) for topic in (*desired, t.rollout(s.model))]

    async def run(self, stop: asyncio.Event, connect_gate: asyncio.Semaphore) -> None:
        worker = asyncio.create_task(self._work(stop))
        sender = asyncio.create_task(self._send_telemetry(stop))
        s = self.settings
        try:
            while not stop.is_set():
                up_s = float(self.rng.exponential(s.flaky_up_s)) if self.flaky else None
                will = aiomqtt.Will(str(s.topics.status(self.device)), encode_payload(self.status("offline")),
                                    qos=1, retain=True)
                try:
                    async with connect_gate:
                        client = aiomqtt.Client(s.host, s.port, identifier=self.device, will=will,
                                                protocol=aiomqtt.ProtocolVersion.V5, keepalive=s.keepalive_s,
                                                timeout=PUBLISH_TIMEOUT_S)
                        await client.__aenter__()
                    try:
                        await self._session(client, stop, up_s)
                    finally:
                        self._client = None
                        await client.__aexit__(None, None, None)
                except aiomqtt.MqttError as e:
                    log.info("event=sim_connection_lost device=%s error=%r", self.device, str(e))
                pause = float(self.rng.exponential(s.flaky_down_s)) if self.flaky and up_s else RECONNECT_S
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
        finally:
            worker.cancel()
            sender.cancel()
            await asyncio.gather(worker, sender, return_exceptions=True)

    async def _session(self, client: aiomqtt.Client, stop: asyncio.Event, up_s: float | None) -> None:
        """Subscribe, say online, deliver what waited, listen until stopped or (a flaky device) until
        ``up_s`` passed; then say offline."""
        await client.subscribe(self._subscriptions())
        self._client = client
        await self._announce()
        await self._flush()
        listener = asyncio.create_task(self._listen(client))
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({listener, stopping}, timeout=up_s, return_when=asyncio.FIRST_COMPLETED)
        for task in (listener, stopping):
            task.cancel()
        await asyncio.gather(listener, stopping, return_exceptions=True)
        if listener in done and listener.exception() is not None:
            raise aiomqtt.MqttError(f"session ended: {listener.exception()}")
        log.debug("event=sim_offline device=%s reason=%s", self.device, "stop" if stop.is_set() else "flaky")
        await client.publish(str(self.settings.topics.status(self.device)),
                             encode_payload(self.status("offline")), qos=1, retain=True)

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            self._received(message.topic.value, payload)

    def _received(self, topic: str, payload: bytes) -> None:
        parsed = self.settings.topics.parse(topic)
        if parsed is None:
            return
        if parsed.kind.name == "ROLLOUT":
            self._command_raw = payload
        else:
            source = ("device" if parsed.device else "group", parsed.kind.per_model)
            self._desired[source] = self._read_desired(payload)
        self._wake.set()

    def _read_desired(self, raw: bytes) -> Desired | None:
        """The desired message verified, or None when empty or for another model."""
        if not raw or named_model(raw) not in (self.settings.model, None):
            return None
        envelope = None
        try:
            envelope = Envelope.from_json(raw)
            payload = verify_envelope(envelope, self.settings.trust)
        except ReleaseRejected as e:
            return Desired(_digest(raw), None, e, _unverified_issued(envelope),
                           identity(envelope.payload) if envelope else None)
        return Desired(_digest(raw), payload, None, payload.issued_at)

    # -- publishing -----------------------------------------------------------------------------------
    async def _publish(self, topic: Topic, body: Body | dict, retain: bool) -> bool:
        """QoS 1; False when the broker is away or did not acknowledge."""
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(str(topic), encode_payload(body), qos=1, retain=retain)
        except aiomqtt.MqttError as e:
            log.debug("event=sim_publish_failed device=%s topic=%s error=%r", self.device, topic, str(e))
            return False
        return True

    async def _announce(self) -> None:
        await self._publish(self.settings.topics.status(self.device), self.status("online"), retain=True)

    async def _report(self, version: int | None, state: str, reason: str | None = None,
                      progress: float | None = None) -> None:
        """The retained update report, on the model's own topic and the shared one; the latest is kept
        while the broker is away."""
        t = self.settings.topics
        log.debug("event=sim_update_state device=%s version=%s state=%s reason=%s", self.device, version,
                  state, reason)
        body = encode_payload(Reported(device=self.device, model=self.settings.model, version=version,
                                       state=state, progress=progress, reason=reason,
                                       active_version=self.active))
        for topic in (t.reported(self.device, self.settings.model), t.reported(self.device)):
            self._unsent[str(topic)] = body
        await self._flush()

    async def _flush(self) -> None:
        client = self._client
        for topic, body in list(self._unsent.items()):
            if client is None:
                return
            try:
                await client.publish(topic, body, qos=1, retain=True)
            except aiomqtt.MqttError:
                return
            if self._unsent.get(topic) is body:
                del self._unsent[topic]

    async def _send_telemetry(self, stop: asyncio.Event) -> None:
        interval = self.settings.interval_s
        await asyncio.sleep(float(self.rng.uniform(0, interval)))  # devices spread over the interval
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(interval)
            now = time.monotonic()
            if self._client is not None and self.active is not None:
                body = self.telemetry.message(self.active, now - last)
                await self._publish(self.settings.topics.telemetry(self.device), body, retain=False)
            last = now

    # -- following releases and waves -------------------------------------------------------------------
    def _effective(self) -> Desired | None:
        """Device level before group; at one level the later issued of the model's own and the shared
        one, the model's own on a tie (docs/design.md §7)."""
        for scope in ("device", "group"):
            own, shared = self._desired[(scope, True)], self._desired[(scope, False)]
            if own and shared:
                return own if own.issued_at >= shared.issued_at else shared
            if own or shared:
                return own or shared
        return None

    def _held(self, desired: Desired | None) -> list[ReleasePayload]:
        """The verified releases this device holds: the effective desired one and the one serving."""
        return [r for r in (desired.payload if desired else None, self._active_release) if r is not None]

    async def _take_command(self, held: list[ReleasePayload]) -> None:
        """Verify the newest retained command against the releases held and keep it when it checks out;
        a refusal is logged and sent as an event once (one for a release not held yet is tried again
        when it arrives)."""
        raw = self._command_raw
        key = _digest(raw)
        if not raw or key == self._tried:
            return
        version = None
        try:
            envelope = Envelope.from_json(raw)
            version = WaveCommand.from_dict(dict(envelope.payload)).version  # malformed before unknown
            release = next((r for r in held if r.version == version), None)
            if release is None:
                raise CommandRefused(CommandReason.UNKNOWN_VERSION, f"no release of {self.settings.model} "
                                     f"version {version} is held here")
            command = verify_command(envelope, release, self.settings.trust, self._commands.get(version))
        except (CommandRefused, ReleaseRejected) as e:
            waits = isinstance(e, CommandRefused) and e.reason is CommandReason.UNKNOWN_VERSION
            if waits and key == self._waiting:
                return
            self._waiting, self._tried = (key, self._tried) if waits else ("", key)
            reason = e.reason.value if isinstance(e, CommandRefused) else CommandReason.MALFORMED.value
            log.info("event=sim_command_refused device=%s version=%s reason=%s detail=%r", self.device,
                     version, reason, e.detail)
            await self._publish(self.settings.topics.events(self.device),
                                Event(device=self.device, type="rollout.command_refused", severity="warning",
                                      data={"model": self.settings.model, "version": version,
                                            "reason": reason, "detail": e.detail}), retain=False)
            return
        self._tried = key
        self._commands[command.version] = command

    def _halted(self, version: int | None) -> WaveCommand | None:
        command = self._commands.get(version) if version is not None else None
        return command if command is not None and command.state == "halted" else None

    async def _work(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._evaluate()
            except Exception:  # a bug must not leave this device deaf for the rest of the run
                log.exception("event=sim_device_error device=%s", self.device)

    async def _evaluate(self) -> None:
        desired = self._effective()
        await self._take_command(self._held(desired))
        if (halt := self._halted(self.active)) is not None and self._active_release is not None:
            await self._roll_back(halt)
        if desired is None:
            return
        if desired.refusal is not None:
            if desired.key not in self._settled:
                self._settled.add(desired.key)
                await self._report(desired.ident[1] if desired.ident else None, "failed",
                                   f"{desired.refusal.reason.value}: {desired.refusal.detail}")
            return
        release = desired.payload
        assert release is not None
        if self.active == release.version or desired.key in self._settled:
            return
        if not in_rollout(self.device, share(release, self._commands.get(release.version)),
                          release.rollout.salt):
            return
        try:
            check_version(release.version, self.active, release.allow_downgrade)
        except ReleaseRejected as e:
            self._settled.add(desired.key)
            await self._report(release.version, "failed", f"{e.reason.value}: {e.detail}")
            return
        await self._apply(desired)

    async def _apply(self, desired: Desired) -> None:
        """downloading → verifying → staged → active, a pause per step; a halt (or another desired
        release) on the way stops it before the swap."""
        release = desired.payload
        assert release is not None
        for state, progress in (("downloading", 0.0), ("verifying", None), ("staged", None)):
            await self._report(release.version, state, progress=progress)
            await asyncio.sleep(self.settings.step_s)
            if (now := self._effective()) is None or now.key != desired.key:
                return  # another release came: the work loop takes it next
            await self._take_command(self._held(desired))
            if (halt := self._halted(release.version)) is not None:
                await self._report(release.version, "failed", _halt_reason(halt, "halted before the swap"))
                return
        self.previous, self.active = (self.active, self._active_release), release.version
        self._active_release = release
        await self._report(release.version, "active")
        await self._announce()

    async def _roll_back(self, halt: WaveCommand) -> None:
        """Back to the version served before the halted one (docs/design.md §12)."""
        if self.previous is None:  # nothing kept to go back to: keeps serving, says why
            await self._report(halt.version, "failed", _halt_reason(halt, "no previous version kept"))
            self._active_release = None
            return
        (self.active, self._active_release), self.previous = self.previous, None
        await self._report(halt.version, "rolled_back", ROLLOUT_HALTED)
        await self._announce()


def _halt_reason(halt: WaveCommand, detail: str = "") -> str:
    """``rollout_halted[: <the command's reason>]``, as the agent reports it."""
    said = "; ".join(part for part in (halt.reason, detail) if part)
    return f"{ROLLOUT_HALTED}: {said}" if said else ROLLOUT_HALTED
