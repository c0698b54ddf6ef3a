"""The fleet stage of ``edgecloud bench`` (``--only fleet``): a thousand simulated devices and a handful
of real agents on one mosquitto, the rollout controller driving releases with waves (docs/design.md §12),
and what it costs and how it decides:

- a good release with four waves: the time until every online device serves it;
- a confidently wrong release (same confidences and latency, audit agreement 0.11 against 0.88): the
  wave it is halted in, the time to the halt, the devices ever active on it against the first wave's
  share, and how long each of them takes to serve the previous version again;
- more good releases, one after the other: how many are halted (false halts);
- broker messages per second, the controller's CPU (share of one core) and peak memory, and how long
  ``fleet status`` and ``fleet rollout status`` take against the whole fleet.

The simulator (``edgecloud fleet simulate``) and the controller (``edgecloud fleet controller``) run as
their command lines do, in their own processes; the figures come from a watcher on the broker, not
from either of them. The real agents serve the bench's edge model and download every release from a
gateway: the wrong release is the same file for them (the simulator's truth is what makes it wrong).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecloud.mqtt.client import Message, MqttClient
from edgecloud.mqtt.topics import FleetTopics, TopicKind
from edgecloud.release import in_rollout, sign_release
from edgecloud.signing import load_private_key, write_keypair
from edgecloud_tools.bench.plan import Bench, progress
from edgecloud_tools.fleet.publish import ReleaseRequest, build_release
from edgecloud_tools.fleet.simulate import SPARE_FILES, device_ids, raise_open_files
from edgecloud_tools.rig import servers
from edgecloud_tools.rig.broker import LocalBroker
from edgecloud_tools.rig.model_files import versioned_copy
from edgecloud_tools.rig.services import ServiceProcess, wait_until, write_toml

FLEET, GROUP, SALT = "bench", "line-1", "bench-waves"
#: what the releases really do: every version answers as the first, but the wrong one
GOOD = {"audit_accuracy": 0.88, "escalation_rate": 0.06, "p95_ms": 2.0}
WRONG = {**GOOD, "audit_accuracy": 0.11}
GATES = {"max_failed_share": 0.2, "max_agree_drop": 0.05, "confidence": 0.95}
SYS_TOPICS = ("$SYS/broker/messages/received", "$SYS/broker/messages/sent")


@dataclass(frozen=True)
class FleetPlan:
    """How big and how long: devices, waves, soak, telemetry interval, good releases for false halts."""

    devices: int
    agents: int
    waves: tuple[float, ...]
    soak_s: float
    min_devices: int
    interval_s: float
    good_runs: int  # good releases rolled out in all (the first is the timed one)
    back_within_s: float = 30.0
    flaky_share: float = 0.02
    offline_share: float = 0.01
    status_wait_s: float = 1.0  # how long ``fleet status`` and ``rollout status`` listen

    def rollout_timeout_s(self) -> float:
        return len(self.waves) * self.soak_s + 120.0


FULL = FleetPlan(devices=1000, agents=5, waves=(1, 10, 50, 100), soak_s=10.0, min_devices=5, interval_s=5.0,
                 good_runs=20)
QUICK = FleetPlan(devices=50, agents=2, waves=(10, 25, 50, 100), soak_s=2.0, min_devices=3, interval_s=1.0,
                  good_runs=2)


@dataclass
class Watch:
    """What the broker says, timed on arrival: every device's status and update reports, the model's
    wave commands, and mosquitto's message counters."""

    model: str
    topics: FleetTopics = field(default_factory=lambda: FleetTopics(FLEET))
    lock: threading.Lock = field(default_factory=threading.Lock)
    status: dict[str, dict] = field(default_factory=dict)  # device → latest status
    reports: list[tuple[float, str, dict]] = field(default_factory=list)  # (time, device, body)
    commands: list[tuple[float, dict]] = field(default_factory=list)  # (time, payload)
    serving: list[tuple[float, str, int | None]] = field(default_factory=list)  # (time, device, version)
    counters: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    def received(self, message: Message) -> None:  # paho's thread: parse and keep, nothing more
        now = time.monotonic()
        if message.topic in SYS_TOPICS:
            self.counters.setdefault(message.topic, []).append((now, int(message.payload)))
            return
        parsed = self.topics.parse(message.topic)
        if parsed is None or not message.payload:
            return
        body = json.loads(message.payload)
        with self.lock:
            if parsed.kind is TopicKind.STATUS:
                self.status[parsed.device] = body
                self.serving.append((now, parsed.device, body.get("active_version")))
            elif parsed.kind is TopicKind.MODEL_REPORTED and parsed.model == self.model:
                self.reports.append((now, parsed.device, body))
            elif parsed.kind is TopicKind.ROLLOUT and parsed.model == self.model:
                self.commands.append((now, body.get("payload", {})))

    def filters(self) -> list[str]:
        return [str(self.topics.every(TopicKind.STATUS)), str(self.topics.every(TopicKind.MODEL_REPORTED)),
                str(self.topics.rollout(self.model)), *SYS_TOPICS]

    def online(self) -> set[str]:
        with self.lock:
            return {d for d, body in self.status.items() if body.get("state") == "online"}

    def all_online_serve(self, version: int) -> bool:
        with self.lock:
            online = [body for body in self.status.values() if body.get("state") == "online"]
        return bool(online) and all(body.get("active_version") == version for body in online)

    def command(self, version: int, states: tuple[str, ...]) -> tuple[float, dict] | None:
        """The first command for ``version`` in one of ``states``."""
        with self.lock:
            return next(((t, c) for t, c in self.commands if c.get("version") == version
                         and c.get("state") in states), None)

    def timeline(self, version: int, since: float, points: int = 200) -> dict[str, list]:
        """Devices serving ``version`` (a release published at ``since``: none before) over time
        (seconds, count), and the model's wave commands for it (seconds, wave, state)."""
        with self.lock:
            events = [(t, d, v) for t, d, v in self.serving if t >= since]
            commands = [(round(t - since, 2), c.get("wave"), c.get("state")) for t, c in self.commands
                        if t >= since and c.get("version") == version]
        serving: dict[str, int | None] = {}
        count, out = 0, [(0.0, 0)]
        for t, d, v in events:
            count += (v == version) - (serving.get(d) == version)
            serving[d] = v
            out.append((round(t - since, 2), count))
        step = max(1, len(out) // points)
        return {"serving": out[::step] + out[-1:], "commands": commands}

    def rate(self, since: float) -> float | None:
        """Messages through the broker per second (received and sent) since ``since``."""
        total = 0.0
        for topic in SYS_TOPICS:
            samples = [s for s in self.counters.get(topic, []) if s[0] >= since]
            if len(samples) < 2:
                return None
            (t0, n0), (t1, n1) = samples[0], samples[-1]
            total += (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        return round(total, 1)


@dataclass
class FleetRig:
    """Broker, gateway, keys, real agents, the simulator, the controller and the watcher."""

    bench: Bench
    plan: FleetPlan
    d: Path
    model: str
    broker: LocalBroker
    key: Path
    public: Path
    gateway: ServiceProcess
    watch: Watch
    client: MqttClient
    agents: list[ServiceProcess]
    simulator: ServiceProcess
    controller: ServiceProcess

    @property
    def devices(self) -> list[str]:
        return [*device_ids("sim", self.plan.devices), *agent_ids(self.plan)]

    def publish(self, version: int) -> float:
        """Sign and publish ``version`` of the edge model with the plan's waves and gates, built as
        ``fleet publish`` builds it (upload to the gateway included); returns when it was sent."""
        model = versioned_copy(self.bench.models.edge, self.d / "releases" / f"v{version}" /
                               self.bench.models.edge.name, version)
        plan = self.plan
        request = ReleaseRequest(model=model, name=self.model, version=version, key=self.key, fleet=FLEET,
                                 group=GROUP, gateway=f"127.0.0.1:{self.gateway.port}",
                                 publisher="edgecloud-bench", rollout_salt=SALT, waves=plan.waves,
                                 gates={"soak_s": plan.soak_s, "min_devices": plan.min_devices, **GATES})
        topics, payload = build_release(request)  # uploads the file; published below, timed
        envelope = sign_release(payload, load_private_key(self.key))
        sent = time.monotonic()
        for topic in topics:
            self.client.publish(topic, envelope.to_json(), qos=1, retain=True)
        return sent


def agent_ids(plan: FleetPlan) -> list[str]:
    """The real agents' device ids: the first inside the first wave's share, so that a real agent takes
    the wrong release and is rolled back by the halt; the others as they come."""
    names = (f"agent-{i}" for i in range(1_000_000))
    first = next(d for d in names if in_rollout(d, plan.waves[0], SALT))
    others = [f"agent-{i}" for i in range(plan.agents) if f"agent-{i}" != first]
    return [first, *others][:plan.agents]


def _truth(path: Path, wrong: int) -> Path:
    path.write_text(json.dumps({"*": GOOD, str(wrong): WRONG}))
    return path


def _agent_config(rig_dir: Path, broker: LocalBroker, public: Path, plan: FleetPlan) -> Path:
    return write_toml(rig_dir / "agent.toml", {
        "fleet": {"name": FLEET, "group": GROUP, "trusted_keys": [str(public)]},
        "mqtt": broker.mqtt_section(), "update": {"watch_s": 2.0},
        "telemetry": {"interval_s": plan.interval_s}})


def _started(service: ServiceProcess, settle_s: float = 2.0) -> ServiceProcess:
    """Start a service that has no health check: it must still run after ``settle_s``."""
    service.ready = lambda: True
    service.start()
    time.sleep(settle_s)
    if service.proc is None or service.proc.poll() is not None:
        raise RuntimeError(f"{service.name} exited at start; its log {service.log_path} ends:\n"
                           + service.log_tail())
    return service


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgecloud_tools.cli", *args]


@contextlib.contextmanager
def fleet_rig(bench: Bench, plan: FleetPlan, wrong_version: int) -> Iterator[FleetRig]:
    d = bench.workdir / "fleet"
    raise_open_files(plan.devices * 2 + SPARE_FILES)  # the broker (a child) inherits it
    broker = LocalBroker(d / "broker", options={"sys_interval": 1, "max_queued_messages": 100000})
    key, public, _ = write_keypair(d / "keys" / "operator")
    model = bench.models.edge_name
    watch = Watch(model)
    started: list[ServiceProcess] = []
    with broker:
        client = MqttClient(broker.mqtt_config(client_id="bench-fleet-watch"),
                            on_message=watch.received).start()
        try:
            client.wait_connected(5)
            for topic in watch.filters():
                client.subscribe(topic)
            gateway = servers.gateway(d, bench.models.repository, "fleet-gw")
            started.append(gateway.start())
            config = _agent_config(d, broker, public, plan)
            agents = []
            for device in agent_ids(plan):
                agents.append(servers.agent(d, bench.models.edge, device, config=config,
                                            device_id=device).start())
                started.append(agents[-1])
            base = f"{broker.host}:{broker.port}"
            simulator = ServiceProcess("fleet-simulate", [], 0, d / "simulate.log", command=_cli(
                "fleet", "simulate", "--mqtt", base, "--fleet", FLEET, "--devices", str(plan.devices),
                "--trusted-key", str(public), "--truth", str(_truth(d / "truth.json", wrong_version)),
                "--group", GROUP, "--model", model, "--interval", str(plan.interval_s),
                "--flaky-share", str(plan.flaky_share), "--offline-share", str(plan.offline_share),
                "--audit-rate", "0.05", "--log-level", "WARNING"),
                ready=lambda: len(watch.online()) >= plan.agents + plan.devices * (
                    1 - plan.offline_share - plan.flaky_share))
            started.append(simulator.start(timeout=300))
            controller = _started(ServiceProcess(
                "fleet-controller", [], 0, d / "controller.log", command=_cli(
                    "fleet", "controller", "--mqtt", base, "--fleet", FLEET, "--key", str(key),
                    "--state-dir", str(d / "controller"), "--trusted-key", str(public))))
            started.append(controller)
            yield FleetRig(bench, plan, d, model, broker, key, public, gateway, watch, client, agents,
                           simulator, controller)
        finally:
            for service in reversed(started):
                servers.stop(service)
            client.close()


def good_rollout(rig: FleetRig, version: int) -> dict[str, Any]:
    """Publish a good release; the time until every online device serves it, or the halt that stopped it."""
    sent = rig.publish(version)
    timeout = rig.plan.rollout_timeout_s()
    reached = wait_until(lambda: rig.watch.all_online_serve(version)
                         or rig.watch.command(version, ("halted",)) is not None, timeout, interval_s=0.1)
    halt = rig.watch.command(version, ("halted",))
    done = rig.watch.command(version, ("complete",))
    return {"version": version, "halted": halt is not None, "timeline": rig.watch.timeline(version, sent),
            "halt_reason": halt[1].get("reason") if halt else None,
            "reached_all_online_s": round(time.monotonic() - sent, 1) if reached and not halt else None,
            "complete_command_s": round(done[0] - sent, 1) if done else None}


def wrong_rollout(rig: FleetRig, version: int, previous: int) -> dict[str, Any]:
    """Publish the confidently wrong release: where and when it is halted, who had it, how soon they are
    back on ``previous``."""
    watch, plan = rig.watch, rig.plan
    first_wave = sum(in_rollout(d, plan.waves[0], SALT) for d in rig.devices)
    mark = len(watch.reports)
    sent = rig.publish(version)
    halted = wait_until(lambda: watch.command(version, ("halted", "complete")) is not None,
                        plan.rollout_timeout_s(), interval_s=0.1)
    verdict = watch.command(version, ("halted", "complete"))
    out: dict[str, Any] = {"version": version, "first_wave_devices": first_wave,
                           "halted": bool(halted and verdict and verdict[1]["state"] == "halted")}
    if not out["halted"]:
        return out
    halt_at, halt = verdict  # type: ignore[misc]

    def exposed() -> set[str]:
        with watch.lock:
            return {d for _, d, b in watch.reports[mark:] if b.get("version") == version
                    and b.get("state") == "active"}

    def back_at() -> dict[str, float]:
        """Each exposed device's first moment on another version after the halt."""
        gone = exposed()
        seen: dict[str, float] = {}
        with watch.lock:
            for t, device, serving in watch.serving:
                if device in gone and t >= halt_at and serving != version and device not in seen:
                    seen[device] = t
        return seen

    wait_until(lambda: set(back_at()) >= exposed(), plan.back_within_s + 30, interval_s=0.2)
    back = back_at()
    with watch.lock:
        late = {d for t, d, b in watch.reports[mark:] if t > halt_at and b.get("version") == version
                and b.get("state") == "active"}
        on_previous = {d for d in back if watch.status.get(d, {}).get("active_version") == previous}
    delays = [t - halt_at for t in back.values()]
    out.update(timeline=watch.timeline(version, sent), halted_in_wave=halt.get("wave"),
               halt_reason=halt.get("reason"),
               time_to_halt_s=round(halt_at - sent, 1), exposed_devices=len(exposed()),
               exposed_agents=sorted(d for d in exposed() if d in agent_ids(plan)),
               activated_after_halt=len(late), back_on_previous=len(on_previous),
               back_within_limit=sum(s <= plan.back_within_s for s in delays),
               back_max_s=round(max(delays), 1) if delays else None,
               not_back=sorted(exposed() - set(back)))
    return out


def timed(command: list[str], timeout_s: float = 60.0) -> dict[str, Any]:
    """Run an operator command; its wall time, exit code, and lines printed."""
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    out = {"seconds": round(time.monotonic() - started, 2), "exit_code": done.returncode,
           "lines": len(done.stdout.splitlines())}
    if done.returncode:
        out["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
    return out


def status_timings(rig: FleetRig) -> dict[str, Any]:
    base = ["--mqtt", f"{rig.broker.host}:{rig.broker.port}", "--fleet", FLEET,
            "--wait", str(rig.plan.status_wait_s)]
    return {"listen_s": rig.plan.status_wait_s,
            "fleet_status": timed(_cli("fleet", "status", *base)),
            "rollout_status": timed(_cli("fleet", "rollout", "status", *base, "--json"))}


def fleet(bench: Bench) -> dict[str, Any]:
    plan = QUICK if bench.plan.quick else FULL
    base_version = 1
    good, wrong = base_version + 1, base_version + 2
    with fleet_rig(bench, plan, wrong) as rig:
        online = len(rig.watch.online())
        started = time.monotonic()
        cpu_before = servers.cpu_seconds(rig.controller.proc.pid)
        with servers.RssSampler(rig.controller.proc.pid, interval_s=0.5) as rss:
            progress(f"fleet: {plan.devices} simulated devices + {plan.agents} agents online ({online}); "
                     f"a good release in {len(plan.waves)} waves")
            runs = [good_rollout(rig, good)]
            statuses = status_timings(rig)
            progress("fleet: a confidently wrong release")
            bad = wrong_rollout(rig, wrong, previous=good)
            for i in range(1, plan.good_runs):
                progress(f"fleet: good release {i + 1} of {plan.good_runs}")
                runs.append(good_rollout(rig, wrong + i))
            elapsed = time.monotonic() - started
            cpu = servers.cpu_seconds(rig.controller.proc.pid) - cpu_before
        rate = rig.watch.rate(started)
        last = runs[-1]["version"]
        agents_on_last = sum(rig.watch.status.get(device, {}).get("active_version") == last
                             for device in agent_ids(plan))
    return {"plan": dataclasses.asdict(plan), "devices": plan.devices + plan.agents,
            "simulated": plan.devices, "agents": plan.agents, "online_at_start": online,
            "agents_on_last_release": agents_on_last,
            "broker_messages_per_s": rate, "seconds": round(elapsed, 1),
            "controller": {"cpu_percent": round(cpu / elapsed * 100, 1), "rss_peak_bytes": rss.peak},
            "good": runs[0], "wrong": bad, "status": statuses,
            "false_halts": {"runs": len(runs), "halted": sum(r["halted"] for r in runs),
                            "reached_s": [r["reached_all_online_s"] for r in runs]}}
