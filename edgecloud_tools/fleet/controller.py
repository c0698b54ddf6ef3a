"""The rollout controller (docs/design.md §12): drives every release with waves of one fleet.

It follows the retained desired topics (the releases, verified with the operator's keys: it drives only
what it can verify, and only when its own key may sign the release's commands), the retained rollout
topics (its own earlier commands and the operator's halt/resume, which it adopts when newer than what
it decided), and the devices' status, reports and telemetry. Messages are folded one by one on one
thread (:class:`RolloutView`); waves are judged on a timer. Per wave it waits for ``soak_s`` since the
wave started and ``min_devices`` active on the new version, then judges the gates against the devices
still on the previous version over the same period (edgecloud_tools.fleet.gates): a wave that passes
advances (or completes, after the last), one that fails halts. Every decision is one log line with the
figures that decided it, committed with the signed command before the command is published (an
outbox), so a controller killed at any point resumes where it was and publishes what the broker never
acknowledged. The counts of the wave in progress are written at every judgement, and taken up again
after a restart (what arrived between the last write and the kill is lost, a second's worth).

One controller drives a fleet: an exclusive lock on the state directory, and a lease row in the
state store renewed every third of its time (for a store shared between hosts). A second controller
is refused at start, says who holds the lease, and exits with code 1; a controller that loses its lease
stops.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO

from pydantic import Field

from edgecloud.clock import format_time, parse_time
from edgecloud.config import Section
from edgecloud.mqtt.client import Message, MqttClient, MqttConfig, MqttError
from edgecloud.release import Gates
from edgecloud.rollout import WaveCommand, command_keys, sign_command
from edgecloud.signing import TrustStore, key_id, load_private_key
from edgecloud_tools.fleet.controller_state import (
    STATE_FILE,
    ControllerState,
    Decision,
    LeaseHeld,
    Rollout,
    SqliteState,
)
from edgecloud_tools.fleet.gates import Share, Verdict, control_baseline, figure_pairs, judge
from edgecloud_tools.fleet.rollout_view import Plan, RolloutView

log = logging.getLogger(__name__)

LOCK_FILE = "controller.lock"
#: a rollout still waiting for the same gates is logged again after this long (not on every judgement)
WAIT_LOG_S = 60.0
#: fault point for tests: "decided" SIGKILLs the controller right after it commits a decision, before
#: it publishes the command
FAULT_ENV = "EDGECLOUD_CONTROLLER_FAULT"


class ControllerSection(Section):
    """``[controller]``: which fleet, with which key, where its state lives."""

    fleet: str = Field(min_length=1, description="fleet id (topic level edgecloud/<fleet>/…)")
    state_dir: Path = Field(description="directory of the state database and its lock")
    key: Path = Field(description="Ed25519 private key that signs wave commands")
    trusted_keys: tuple[Path, ...] = Field((), description="public keys releases are verified with "
                                                           "(default: the controller's own key's)")
    controller_id: str = Field(default_factory=socket.gethostname,
                               description="holder name of the lease (the same across restarts)")
    judge_interval_s: float = Field(1.0, gt=0, description="how often waves are judged")
    lease_s: float = Field(15.0, gt=0, description="lease time; renewed every third of it")
    settle_s: float = Field(2.0, ge=0, description="wait after connecting for the retained topics")


class ControllerConfig(Section):
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    controller: ControllerSection


class StateDirLock:
    """An exclusive ``flock`` on ``<state_dir>/controller.lock``: held until closed or the process
    dies (the kernel lets it go on kill -9)."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(state_dir / LOCK_FILE, "a+")  # noqa: SIM115  held for the run
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise LeaseHeld(f"state directory {state_dir} is locked by {holder}") from None
        self._file.truncate(0)
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _shares(baseline: dict[str, dict[str, float]]) -> dict[str, Share]:
    return {name: Share(**values) for name, values in baseline.items()}


class Controller:
    """Drives the rollouts of one fleet until :meth:`run`'s ``stop`` is set."""

    def __init__(self, config: ControllerConfig) -> None:
        cfg = config.controller
        self.config = config
        self.key = load_private_key(cfg.key)
        self.key_id = key_id(self.key.public_key())
        # releases are verified before they are driven: a forged release must not get gates waived
        # for a real one of the same version. Without --trusted-key, its own key signs the releases.
        self.trust = (TrustStore.from_files(cfg.trusted_keys) if cfg.trusted_keys
                      else TrustStore({self.key_id: self.key.public_key()}))
        self.view = RolloutView(cfg.fleet, self.trust)
        self.lease = f"rollout-controller/{cfg.fleet}"
        self.rollouts: dict[tuple[str, int], Rollout] = {}
        self._inbox: queue.Queue[Message] = queue.Queue()
        #: per rollout, the gates last logged as waiting and when (monotonic)
        self._waiting: dict[tuple[str, int], tuple[str, float]] = {}
        self._ignored: set[tuple[str, int]] = set()
        #: by model, the version whose counts the view's period holds
        self._counting: dict[str, int] = {}

    def run(self, stop: threading.Event) -> None:
        """Lock, take the lease, connect and drive until ``stop``; LeaseHeld when another holds it."""
        cfg = self.config.controller
        lock = StateDirLock(cfg.state_dir)
        state: ControllerState = SqliteState(cfg.state_dir / STATE_FILE)
        client = MqttClient(self.config.mqtt, on_message=self._inbox.put)
        try:
            state.acquire_lease(self.lease, cfg.controller_id, cfg.lease_s)
            self.rollouts = state.rollouts()
            log.info("event=controller_started fleet=%s holder=%s key=%s rollouts=%d", cfg.fleet,
                     cfg.controller_id, self.key_id, len(self.rollouts))
            for wildcard in self.view.filters():
                client.subscribe(wildcard)
            client.start()
            self._loop(stop, state, client)
        finally:
            client.close()
            state.release_lease(self.lease, cfg.controller_id)
            state.close()
            lock.close()

    def _loop(self, stop: threading.Event, state: ControllerState, client: MqttClient) -> None:
        cfg = self.config.controller
        next_tick = renew_at = time.monotonic()
        connected_since: float | None = None
        while not stop.is_set():
            try:
                message = self._inbox.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                pass
            else:
                self._apply(message)
                if time.monotonic() < next_tick:
                    continue
            now = time.monotonic()
            next_tick = now + cfg.judge_interval_s
            if now >= renew_at:
                state.acquire_lease(self.lease, cfg.controller_id, cfg.lease_s)  # LeaseHeld: stop
                renew_at = now + cfg.lease_s / 3
            connected_since = (connected_since or now) if client.is_connected else None
            if connected_since is not None and now - connected_since >= cfg.settle_s:
                self.tick(state, client, time.time())

    def _apply(self, message: Message) -> None:
        """Fold one message; one that breaks the folding is dropped and logged, the service goes on."""
        try:
            self.view.apply(message)
        except Exception as e:  # a device's bad message must not stop the fleet's rollouts
            log.warning("event=controller_message_dropped topic=%s error=%r", message.topic, str(e))

    # -- one pass over the plans ------------------------------------------------------------------------
    def tick(self, state: ControllerState, client: MqttClient, now: float) -> None:
        for model, plan in self.view.plans.items():
            key = (model, plan.release.version)
            if not self._drivable(plan):
                continue
            rollout = self._reconcile(plan, self.rollouts.get(key), state, now)
            if rollout.outbox is not None:
                rollout = self._publish(rollout, state, client)
            if rollout.state == "advancing" and rollout.outbox is None:
                self._judge(plan, rollout, state, client, now)
            if changed := self.view.take_changed(model):
                state.save_counts(model, plan.release.version, changed)

    def _drivable(self, plan: Plan) -> bool:
        """Whether devices would take this controller's commands for the plan (logged once if not)."""
        release = plan.release
        if self.key_id in command_keys(release, self.trust):
            return True
        key = (release.model, release.version)
        if key not in self._ignored:
            self._ignored.add(key)
            allowed = release.rollout.controller_key or "a key of --trusted-key"
            log.warning("event=rollout_not_driven model=%s version=%d reason=%r", release.model,
                        release.version, f"commands must be signed by {allowed}; this controller signs "
                        f"with {self.key_id}")
        return False

    def _reconcile(self, plan: Plan, rollout: Rollout | None, state: ControllerState, now: float) -> Rollout:
        """The rollout as stored, a new one for a release seen the first time, or one moved by a newer
        command on the rollout topic than the last this controller signed (the operator's)."""
        release = plan.release
        command = self.view.command(release.model)
        if rollout is not None and self._counting.get(release.model) != release.version:  # first look
            self._counting[release.model] = release.version
            counts = state.wave_counts(release.model, release.version)
            self.view.open_period(release.model, counts)
            log.info("event=rollout_resumed model=%s version=%d wave=%d state=%s devices=%d audited=%d",
                     release.model, release.version, rollout.wave, rollout.state, len(counts),
                     sum(c.audited for c in counts.values()))
        if rollout is None:
            self._counting[release.model] = release.version
            self.view.open_period(release.model)
            started = min(release.issued_at.timestamp(), now)
            rollout = Rollout(release.model, release.version, wave_started=started)
            reason = "release found"
            if command is not None:
                rollout = self._adopted(rollout, command, now)
                reason = f"release found, following its {command.state} command for wave {command.wave}"
            self._save(rollout, state, now, reason, {})
            log.info("event=rollout_found model=%s version=%d waves=%s wave=%d state=%s", release.model,
                     release.version, list(plan.waves), rollout.wave, rollout.state)
        elif command is not None and (rollout.issued_at is None
                                      or command.issued_at > parse_time(rollout.issued_at)):
            rollout = self._adopted(rollout, command, now)
            self._save(rollout, state, now, f"command adopted: {command.reason}", {}, new_wave=True)
            log.info("event=rollout_command_adopted model=%s version=%d wave=%d state=%s reason=%r",
                     release.model, release.version, command.wave, command.state, command.reason)
        return rollout

    def _adopted(self, rollout: Rollout, command: WaveCommand, now: float) -> Rollout:
        self.view.open_period(rollout.model)
        return rollout.moved(wave=command.wave, state=command.state, reason=command.reason,
                             wave_started=min(command.issued_at.timestamp(), now),
                             issued_at=format_time(command.issued_at), outbox=None)

    def _save(self, rollout: Rollout, state: ControllerState, now: float, reason: str,
              figures: dict[str, float | int | str], new_wave: bool = False) -> None:
        decision = Decision(rollout.model, rollout.version, rollout.wave, rollout.state, now, reason, figures)
        state.save(rollout, decision, new_wave=new_wave)
        self.rollouts[(rollout.model, rollout.version)] = rollout

    def _judge(self, plan: Plan, rollout: Rollout, state: ControllerState, client: MqttClient,
               now: float) -> None:
        gates = plan.release.rollout.gates or Gates()
        key = (rollout.model, rollout.version)
        soaked = now - rollout.wave_started
        if soaked < (gates.soak_s or 0):
            return
        cohorts = self.view.cohorts(plan, self.view.period[rollout.model])
        verdict = judge(gates, cohorts, _shares(rollout.baseline))
        if verdict.outcome == "wait":
            gates_waiting = " ".join(part.split(":", 1)[0] for part in verdict.reason.split("; "))
            last = self._waiting.get(key)
            if last is None or last[0] != gates_waiting or time.monotonic() - last[1] >= WAIT_LOG_S:
                self._waiting[key] = (gates_waiting, time.monotonic())
                log.info("event=rollout_waiting model=%s version=%d wave=%d soaked_s=%.0f reason=%r %s",
                         rollout.model, rollout.version, rollout.wave, soaked, verdict.reason,
                         figure_pairs(verdict.figures))
            return
        self._waiting.pop(key, None)
        baseline = {name: asdict(share) for name, share in control_baseline(cohorts).items()}
        self._decide(plan, rollout, verdict, baseline or rollout.baseline, state, client, now)

    def _decide(self, plan: Plan, rollout: Rollout, verdict: Verdict, baseline: dict[str, dict[str, float]],
                state: ControllerState, client: MqttClient, now: float) -> None:
        last = len(plan.waves) - 1
        if verdict.outcome == "fail":
            wave, command_state, event = rollout.wave, "halted", "rollout_halted"
        elif rollout.wave < last:
            wave, command_state, event = rollout.wave + 1, "advancing", "rollout_wave_advanced"
        else:
            wave, command_state, event = last, "complete", "rollout_complete"
        issued = datetime.fromtimestamp(int(now), timezone.utc)
        if rollout.issued_at is not None:  # strictly after the last command, which devices compare
            issued = max(issued, parse_time(rollout.issued_at) + timedelta(seconds=1))
        command = WaveCommand(rollout.model, rollout.version, wave, command_state, issued, verdict.reason)
        envelope = sign_command(command, self.key)
        moved = rollout.moved(wave=wave, state=command_state, wave_started=now, reason=verdict.reason,
                              issued_at=format_time(issued), baseline=baseline,
                              outbox=envelope.to_json().decode())
        self._save(moved, state, now, verdict.reason, verdict.figures, new_wave=True)
        log.info("event=%s model=%s version=%d wave=%d judged_wave=%d percent=%g reason=%r %s", event,
                 rollout.model, rollout.version, wave, rollout.wave, plan.waves[wave], verdict.reason,
                 figure_pairs(verdict.figures))
        if os.environ.get(FAULT_ENV) == "decided":
            os.kill(os.getpid(), signal.SIGKILL)
        self.view.open_period(rollout.model)
        self._publish(moved, state, client)

    def _publish(self, rollout: Rollout, state: ControllerState, client: MqttClient) -> Rollout:
        """Hand the outbox's command to the broker (retained, QoS 1); kept for the next tick on failure."""
        topic = self.view.topics.rollout(rollout.model)
        try:
            client.publish(topic, (rollout.outbox or "").encode(), qos=1, retain=True)
        except MqttError as e:
            log.warning("event=rollout_command_not_published model=%s version=%d error=%r", rollout.model,
                        rollout.version, str(e))
            return rollout
        published = rollout.moved(outbox=None)
        state.save(published)
        self.rollouts[(rollout.model, rollout.version)] = published
        log.info("event=rollout_command_published model=%s version=%d wave=%d state=%s issued_at=%s",
                 rollout.model, rollout.version, rollout.wave, rollout.state, rollout.issued_at)
        return published
