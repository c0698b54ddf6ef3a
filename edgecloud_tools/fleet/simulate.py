"""``edgecloud fleet simulate``: many simulated devices in one process, one MQTT session each, that
follow releases and wave commands as the agent does and send telemetry drawn from a truth per version
(:mod:`edgecloud_tools.fleet.sim_device`, :mod:`edgecloud_tools.fleet.sim_telemetry`), until stopped.

The sessions share one asyncio loop (aiomqtt): paho's own client runs a thread per connection, which
a thousand devices on two cores cannot afford. Some devices are flaky (they drop offline and come
back, saying so on their status), some stay offline all along (their retained status says offline
from the start, as a device seen once and gone). Which ones is drawn from ``--seed``, as is every
figure, so two runs with one seed pick the same devices.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import resource
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import numpy as np

from edgecloud.config import host_port
from edgecloud.errors import ConfigError
from edgecloud.logs import setup_logging
from edgecloud.mqtt.client import encode_payload
from edgecloud.mqtt.topics import FleetTopics, check_id
from edgecloud.signing import TrustStore
from edgecloud_tools.cli import positive_int
from edgecloud_tools.fleet.sim_device import DeviceSettings, SimDevice
from edgecloud_tools.fleet.sim_telemetry import Truth

log = logging.getLogger(__name__)

#: connections opened at once: a thousand at the same instant only measures the broker's accept queue
CONNECTS_AT_ONCE = 32
#: file descriptors beyond one per device (the loop, logs, the executor's sockets)
SPARE_FILES = 256
SUMMARY_S = 30.0


@dataclass(frozen=True)
class Roles:
    """Which devices are flaky and which stay offline, by index."""

    flaky: frozenset[int]
    offline: frozenset[int]

    @classmethod
    def draw(cls, devices: int, flaky_share: float, offline_share: float, seed: int) -> Roles:
        order = np.random.default_rng((seed, 1)).permutation(devices).tolist()
        n_offline, n_flaky = round(devices * offline_share), round(devices * flaky_share)
        return cls(frozenset(order[n_offline:n_offline + n_flaky]), frozenset(order[:n_offline]))


def device_ids(prefix: str, devices: int) -> list[str]:
    """``<prefix>-0000``, …: ids that sort in order."""
    width = max(4, len(str(devices - 1)))
    return [check_id("device", f"{prefix}-{i:0{width}d}") for i in range(devices)]


def raise_open_files(needed: int) -> int:
    """Raise this process's soft limit of open files to ``needed`` (children inherit it: a broker
    started afterwards can take as many connections); ConfigError when the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed or soft == resource.RLIM_INFINITY:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigError(f"--devices needs {needed} open files; the hard limit is {hard} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed


@dataclass(frozen=True)
class Simulation:
    """One simulation: the devices' shared settings, how many, which are flaky or offline."""

    settings: DeviceSettings
    devices: int
    prefix: str = "sim"
    initial_version: int = 1
    flaky_share: float = 0.05
    offline_share: float = 0.02
    seed: int = 0

    def build(self) -> tuple[list[SimDevice], list[SimDevice]]:
        """The devices that connect, and those offline all along."""
        roles = Roles.draw(self.devices, self.flaky_share, self.offline_share, self.seed)
        live, offline = [], []
        for i, device in enumerate(device_ids(self.prefix, self.devices)):
            sim = SimDevice(device, self.settings, np.random.default_rng((self.seed, 2, i)),
                            self.initial_version, flaky=i in roles.flaky)
            (offline if i in roles.offline else live).append(sim)
        return live, offline


async def _say_offline(settings: DeviceSettings, devices: list[SimDevice]) -> None:
    """The retained status of devices offline all along: offline, as a device seen once and gone."""
    if not devices:
        return
    async with aiomqtt.Client(settings.host, settings.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        for sim in devices:
            status = encode_payload(sim.status("offline"))
            await client.publish(str(settings.topics.status(sim.device)), status, qos=1, retain=True)


async def _summarize(devices: list[SimDevice], stop: asyncio.Event) -> None:
    while True:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), SUMMARY_S)
        versions = Counter(d.active for d in devices)
        log.info("event=sim_summary connected=%d active=%s", sum(d.connected for d in devices),
                 ",".join(f"v{v}:{n}" for v, n in sorted(versions.items(), key=lambda kv: str(kv[0]))))
        if stop.is_set():
            return


async def simulate(simulation: Simulation, stop: asyncio.Event) -> list[SimDevice]:
    """Run every device until ``stop`` is set; then each says offline and disconnects."""
    live, offline = simulation.build()
    await _say_offline(simulation.settings, offline)
    gate = asyncio.Semaphore(CONNECTS_AT_ONCE)
    log.info("event=sim_started devices=%d flaky=%d offline=%d fleet=%s group=%s model=%s broker=%s:%d",
             simulation.devices, sum(d.flaky for d in live), len(offline), simulation.settings.topics.fleet,
             simulation.settings.group, simulation.settings.model, simulation.settings.host,
             simulation.settings.port)
    summary = asyncio.create_task(_summarize(live, stop))
    await asyncio.gather(*(device.run(stop, gate) for device in live))
    await summary
    log.info("event=sim_stopped devices=%d", len(live))
    return live + offline


# -- command line -----------------------------------------------------------------------------------------
def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {value}")
    return value


def register(actions: argparse._SubParsersAction) -> None:
    """``edgecloud fleet simulate`` (the ``fleet`` command's actions are publish.py's)."""
    p = actions.add_parser(
        "simulate", help="many simulated devices that follow releases and waves, until stopped",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mqtt", required=True, metavar="HOST:PORT", help="the fleet's MQTT broker (plaintext)")
    p.add_argument("--fleet", required=True, help="fleet id (topic level edgecloud/<fleet>/…)")
    p.add_argument("--devices", required=True, type=positive_int, help="how many devices")
    p.add_argument("--trusted-key", required=True, action="append", type=Path, metavar="PEM",
                   help="public key releases may be signed with (repeatable)")
    p.add_argument("--truth", required=True, type=Path, metavar="FILE.json",
                   help='what each version does: {"<version>"|"*": {"audit_accuracy", "escalation_rate", '
                        '"p95_ms", "escalated_agreement"}}')
    p.add_argument("--group", default="sim", help="group whose releases they follow (default sim)")
    p.add_argument("--model", default="digits", help="the model they serve (default digits)")
    p.add_argument("--initial-version", type=int, default=1, help="the version they serve at start (1)")
    p.add_argument("--prefix", default="sim", help="device ids are <prefix>-0000… (default sim)")
    p.add_argument("--interval", type=_seconds, default=5.0, metavar="SECONDS", help="telemetry (default 5)")
    p.add_argument("--step", type=_seconds, default=0.2, metavar="SECONDS",
                   help="each update step: downloading, verifying, staged (default 0.2)")
    p.add_argument("--flaky-share", type=_share, default=0.05, help="devices that drop and return (0.05)")
    p.add_argument("--flaky-up", type=_seconds, default=60.0, metavar="SECONDS",
                   help="a flaky device's mean time connected (default 60)")
    p.add_argument("--flaky-down", type=_seconds, default=10.0, metavar="SECONDS",
                   help="its mean time away (default 10)")
    p.add_argument("--offline-share", type=_share, default=0.02, help="devices offline all along (0.02)")
    p.add_argument("--rows-per-s", type=float, default=20.0, help="rows each device answers per second (20)")
    p.add_argument("--audit-rate", type=_share, default=0.02, help="share of confident rows audited (0.02)")
    p.add_argument("--device-spread", type=float, default=0.02,
                   help="standard deviation of a device's own agreement around its version's (0.02)")
    p.add_argument("--seed", type=int, default=0, help="of every draw (default 0)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.set_defaults(func=run_simulate)


def simulation_from_args(args: argparse.Namespace) -> Simulation:
    broker = host_port("--mqtt", args.mqtt)
    try:
        topics = FleetTopics(args.fleet)
        check_id("group", args.group)
        check_id("model", args.model)
        device_ids(args.prefix, 1)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    settings = DeviceSettings(
        host=broker["host"], port=broker["port"], topics=topics, group=args.group, model=args.model,
        trust=TrustStore.from_files(args.trusted_key), truth=Truth.read(args.truth),
        interval_s=args.interval, step_s=args.step, flaky_up_s=args.flaky_up, flaky_down_s=args.flaky_down,
        rows_per_s=args.rows_per_s, audit_rate=args.audit_rate, device_spread=args.device_spread)
    return Simulation(settings, args.devices, args.prefix, args.initial_version, args.flaky_share,
                      args.offline_share, args.seed)


def run_simulate(args: argparse.Namespace) -> int:
    simulation = simulation_from_args(args)
    setup_logging(args.log_level)
    raise_open_files(simulation.devices + SPARE_FILES)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await simulate(simulation, stop)

    asyncio.run(main())
    return 0
