"""Faults of the fleet path, with a broker, a signing key, a gateway holding the releases and one agent
following its group: the broker restarted while telemetry flows, releases the agent must refuse, and
the same model re-released while the traffic moves from batch 1 to batch 64 (docs/design.md §7)."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from edgecloud.clock import utc_now
from edgecloud.endpoint import free_loopback_port
from edgecloud.mqtt.client import Message, MqttClient
from edgecloud.mqtt.topics import FleetTopics
from edgecloud.release import sign_release
from edgecloud.signing import load_private_key, write_keypair
from edgecloud_tools.faults.harness import Load, agent_count, escalate
from edgecloud_tools.faults.plan import Faults, Outcome, progress
from edgecloud_tools.fleet.publish import ReleaseRequest, build_release, publish_release
from edgecloud_tools.rig import servers
from edgecloud_tools.rig.broker import LocalBroker
from edgecloud_tools.rig.model_files import versioned_copy
from edgecloud_tools.rig.services import ServiceProcess, wait_until, write_toml

FLEET, GROUP, DEVICE = "faults", "line-1", "fleet-1"
#: telemetry interval of the agent: several messages inside a short broker outage
TELEMETRY_S = 0.2


class Rig:
    """Broker, key, release gateway, watcher and one agent in the fleet; a context manager."""

    def __init__(self, f: Faults, name: str, watch_s: float = 60.0) -> None:
        self.f, self.d = f, f.dir(name)
        self.broker = LocalBroker(self.d / "broker")
        self.private, public, _ = write_keypair(self.d / "keys" / "release")
        self.stranger, _, _ = write_keypair(self.d / "keys" / "stranger")
        self.topics = FleetTopics(FLEET)
        self.gateway = servers.gateway(self.d, f.models.repository, "gw")
        self.metrics = free_loopback_port()
        config = write_toml(self.d / "agent.toml", {
            "fleet": {"name": FLEET, "group": GROUP, "trusted_keys": [str(public)]},
            "mqtt": self.broker.mqtt_section(), "update": {"watch_s": watch_s},
            "telemetry": {"interval_s": TELEMETRY_S}})
        self.agent: ServiceProcess = servers.agent(self.d, f.models.edge, DEVICE, config=config,
                                                   device_id=DEVICE, metrics_port=self.metrics)
        self.messages: list[tuple[str, Any]] = []  # (kind, body) as received
        self._lock = threading.Lock()
        self._watcher: MqttClient | None = None

    def __enter__(self) -> Rig:
        self.broker.start()
        watcher = self.broker.mqtt_config(client_id="faults-watcher", session_expiry_s=300)
        self._watcher = MqttClient(watcher, on_message=self._received).start()
        self._watcher.wait_connected(5)
        topics = self.topics
        for topic in (topics.reported(DEVICE), topics.events(DEVICE), topics.telemetry(DEVICE)):
            self._watcher.subscribe(topic)
        self.gateway.start()
        self.agent.start()
        return self

    def __exit__(self, *exc: object) -> None:
        servers.stop(self.agent)
        self.gateway.stop()
        if self._watcher is not None:
            self._watcher.close()
        self.broker.stop()

    def _received(self, message: Message) -> None:
        if not message.payload:
            return
        kind = message.topic.rsplit("/", 1)[-1]
        try:
            body = message.json()
        except ValueError:
            return
        with self._lock:
            self.messages.append((kind, body))

    def of(self, kind: str, since: int = 0) -> list[Any]:
        with self._lock:
            return [body for k, body in self.messages[since:] if k == kind]

    @property
    def mark(self) -> int:
        with self._lock:
            return len(self.messages)

    def load(self, prefix: str, batch: int = 1) -> Load:
        return Load(self.agent.port, self.f.models.edge_name, self.f.input["name"], self.f.images(128),
                    prefix, 1, params=escalate("never"), batch=batch, pause_s=0.01)

    def request(self, model: Path, version: int, key: Path | None = None, **fields: Any) -> ReleaseRequest:
        return ReleaseRequest(model=model, name=self.f.models.edge_name, version=version,
                              key=key or self.private, fleet=FLEET, group=GROUP,
                              gateway=f"127.0.0.1:{self.gateway.port}", publisher="edgecloud-faults",
                              **fields)

    def publish(self, model: Path, version: int, key: Path | None = None, now: Any = None,
                **fields: Any) -> None:
        publish_release(self.request(model, version, key, **fields), self.broker.mqtt_config(), now=now)

    def send(self, data: bytes) -> None:
        """Raw bytes retained on the model's desired topic of the group (a forged or unreadable
        release), where they replace the release ``publish`` put there."""
        with MqttClient(self.broker.mqtt_config()) as client:
            client.wait_connected(5)
            client.publish(self.topics.group_desired(GROUP, self.f.models.edge_name), data, qos=1,
                           retain=True)

    def report(self, since: int, version: int | None, states: tuple[str, ...],
               timeout_s: float) -> dict | None:
        """The first ``model/reported`` after ``since`` for ``version`` in one of ``states``."""
        found: list[dict] = []

        def look() -> bool:
            found[:] = [b for b in self.of("reported", since) if b.get("version") == version
                        and b.get("state") in states]
            return bool(found)

        wait_until(look, timeout_s)
        return found[0] if found else None


def broker_restart(f: Faults) -> Outcome:
    out = Outcome("broker_restart", f"the MQTT broker stopped for {f.plan.outage_s:g} s and started again "
                  "while telemetry flows: serving unaffected, every telemetry message delivered once, in "
                  "order of seq, none dropped")
    with Rig(f, "broker-restart") as rig, servers.RssSampler(rig.agent.proc.pid) as rss:
        with rig.load("br") as load:
            wait_until(lambda: len(rig.of("telemetry")) >= 3, 10.0)
            rig.broker.stop()
            progress(f"broker restart: stopped after {len(rig.of('telemetry'))} telemetry messages")
            time.sleep(f.plan.outage_s)
            rig.broker.start()
            back = rig.mark
            wait_until(lambda: len(rig.of("telemetry", back)) >= 3, 20.0)
        dropped = agent_count(rig.metrics, "telemetry_dropped_messages_total")
    seqs = [body["seq"] for body in rig.of("telemetry")]
    out.rss_before_bytes, out.rss_peak_bytes = rss.before, rss.peak
    load.record(out, f.promises.answer_ms)
    span = (max(seqs) - min(seqs) + 1) if seqs else 0
    out.stored, out.expected = len(set(seqs)), span
    out.figures.update(telemetry_messages=len(seqs), duplicates=len(seqs) - len(set(seqs)), dropped=dropped)
    out.check("no call failed", out.failed == 0, f"{out.failed} failed")
    out.check("every telemetry seq delivered, none twice, none dropped",
              span > 0 and len(set(seqs)) == span == len(seqs) and not dropped,
              f"{len(set(seqs))} distinct of seq {min(seqs, default=None)}..{max(seqs, default=None)}, "
              f"{len(seqs) - len(set(seqs))} twice, {dropped} dropped")
    out.check("telemetry after the restart", len(rig.of("telemetry", back)) >= 3,
              f"{len(rig.of('telemetry', back))} messages after")
    return out


def _renamed_output(model: Path, dest: Path) -> Path:
    """The model with its output renamed (``logits`` → ``scores``: same length, so the protobuf stays
    valid), and no card: a release that breaks the serving contract."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(model.read_bytes().replace(b"logits", b"scores"))
    return dest


def bad_releases(f: Faults) -> Outcome:
    out = Outcome("bad_releases", "releases the agent must refuse (forged, unknown key, expired, not newer, "
                  "unloadable, renamed output, unreadable envelope) each reported with its exact reason "
                  "code on model/reported, while version 1 goes on answering")
    with Rig(f, "bad-releases") as rig, servers.RssSampler(rig.agent.proc.pid) as rss:
        d, model = rig.d, f.models.edge
        now = utc_now()

        def forged() -> None:
            _, payload = build_release(rig.request(versioned_copy(model, d / "v2" / model.name, 2), 2))
            envelope = sign_release(payload, load_private_key(rig.private)).to_dict()
            rig.send(json.dumps({**envelope, "payload": {**envelope["payload"], "version": 3}}).encode())

        junk = d / "junk" / model.name
        junk.parent.mkdir(parents=True, exist_ok=True)
        junk.write_bytes(b"\x08\x07" + bytes(range(256)) * 8)
        cases = {  # what → (publish it, the version reported, the reason code)
            "forged signature": (forged, 3, "bad_signature"),
            "unknown key": (lambda: rig.publish(versioned_copy(model, d / "v4" / model.name, 4), 4,
                                                key=rig.stranger), 4, "unknown_key"),
            "expired": (lambda: rig.publish(versioned_copy(model, d / "v5" / model.name, 5), 5,
                                            now=now - timedelta(days=2), expires_at=now - timedelta(days=1)),
                        5, "expired"),
            "not newer": (lambda: rig.publish(versioned_copy(model, d / "v0" / model.name, 0), 0), 0,
                          "not_newer"),
            "unloadable": (lambda: rig.publish(junk, 6), 6, "unloadable"),
            "renamed output": (lambda: rig.publish(_renamed_output(model, d / "v7" / model.name), 7), 7,
                               "contract_mismatch"),
            "unreadable envelope": (lambda: rig.send(b"this is not a release"), None, "malformed"),
        }
        reasons: dict[str, str | None] = {}
        with rig.load("bad") as load:
            load.wait_done(5)
            for what, (publish, version, code) in cases.items():
                since = rig.mark
                publish()
                report = rig.report(since, version, ("failed",), f.promises.report_s)
                reasons[what] = None if report is None else report.get("reason")
                got = (reasons[what] or "").split(":")[0]
                out.check(f"{what}: refused as {code}", got == code, reasons[what] or "no report")
            load.wait_done(load.done + 5)
        versions = {c.version for c in load.calls if c.code == "OK"}
    out.rss_before_bytes, out.rss_peak_bytes = rss.before, rss.peak
    load.record(out, f.promises.answer_ms)
    out.figures.update(reasons=reasons, versions_served=sorted(versions))
    out.check("no call failed while refusing", out.failed == 0, f"{out.failed} failed")
    out.check("version 1 served throughout", versions == {"1"}, str(sorted(versions)))
    return out


def batch_mix(f: Faults) -> Outcome:
    out = Outcome("batch_mix", "the same model re-released as v2 while the traffic moves from batch 1 to "
                  "batch 64: the watch window compares like with like and passes (no rollback)")
    with Rig(f, "batch-mix", watch_s=f.plan.watch_s) as rig, servers.RssSampler(rig.agent.proc.pid) as rss:
        v2 = versioned_copy(f.models.edge, rig.d / "v2" / f.models.edge.name, 2)
        with rig.load("b1") as small:
            small.wait_done(50)
            since = rig.mark
            rig.publish(v2, 2)
            active = rig.report(since, 2, ("active", "failed"), f.promises.report_s)
        with rig.load("b64", batch=64) as big:
            def settled_now() -> bool:
                passed = any(e.get("type") == "update.watch_passed" for e in rig.of("events", since))
                return passed or rig.report(since, 2, ("rolled_back",), 0) is not None

            settled = wait_until(settled_now, f.plan.watch_s + f.promises.report_s)
        rolled = rig.report(since, 2, ("rolled_back",), 0)
    out.rss_before_bytes, out.rss_peak_bytes = rss.before, rss.peak
    calls = small.calls + big.calls
    big.record(out, f.promises.answer_ms)  # the p99 of the batch-64 calls; the counts of all
    out.answered, out.failed = sum(c.code == "OK" for c in calls), sum(c.code != "OK" for c in calls)
    out.figures.update(batch1_calls=len(small.calls), batch64_calls=len(big.calls),
                       active=None if active is None else active.get("state"),
                       rolled_back=None if rolled is None else rolled.get("reason"))
    out.check("v2 became active", active is not None and active.get("state") == "active",
              str(active and active.get("state")))
    out.check("the watch window passed", settled and rolled is None,
              "passed" if rolled is None and settled else str(rolled and rolled.get("reason")))
    out.check("no call failed", out.failed == 0, f"{out.failed} failed")
    return out
