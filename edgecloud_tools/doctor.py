"""``edgecloud doctor``: check a device against its agent configuration and say what to fix, one line per
check: the model (and a TensorRT engine against the TensorRT installed), the GPU and its clocks, the
cloud and the broker reached with the configured certificates, the certificates' expiry, the clock,
free disk for the spool, and the systemd unit.

Each check is ``ok``, ``warn``, ``FAIL`` or ``skipped: needs …`` (a Jetson check on another machine,
systemd where it does not run). Exit 1 when any check fails, 2 for a configuration that does not load.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import grpc

from edge_agent.config import AgentConfig
from edge_agent.update.state import StateStore, UpdateState
from edgecloud.backends import backend_class, backend_key_for
from edgecloud.channel import bearer_metadata, open_channel
from edgecloud.client import KServeClient
from edgecloud.clock import format_time, parse_time, utc_now
from edgecloud.config import build, read_toml
from edgecloud.engine.builder import installed_tensorrt_version
from edgecloud.engine.sidecar import check_compatible, device_model, read_sidecar
from edgecloud.errors import ConfigError, EdgecloudError
from edgecloud.files import file_sha256
from edgecloud.modelcard import read_card, served_name
from edgecloud.mqtt.client import MqttClient, MqttError

DEFAULT_CONFIG = Path("/etc/edge-agent/agent.toml")
DEFAULT_UNIT = "edge-agent.service"
#: JetPack's release file: present on a Jetson, and only there
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
#: the GPU's control node under JetPack 5 and JetPack 6 names (deploy/jetson/edge-agent.service)
GPU_NODES = (Path("/dev/nvhost-ctrl-gpu"), Path("/dev/nvgpu/igpu0/ctrl"))
#: the GPU's frequency scaling in sysfs (jetson_clocks pins cur_freq to max_freq)
GPU_DEVFREQ = "/sys/class/devfreq/*gpu*"
#: a certificate that expires sooner than this is a warning
CERT_WARN = timedelta(days=30)
NEEDS_JETSON = f"needs Jetson hardware (no {TEGRA_RELEASE})"


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, how it stands, and what to do about it."""

    name: str
    status: str  # ok | warn | FAIL | skipped
    message: str

    def __str__(self) -> str:
        return f"{self.status:8}{self.name}: {self.message}"


def ok(name: str, message: str) -> Check:
    return Check(name, "ok", message)


def warn(name: str, message: str) -> Check:
    return Check(name, "warn", message)


def fail(name: str, message: str) -> Check:
    return Check(name, "FAIL", message)


def skipped(name: str, needs: str) -> Check:
    return Check(name, "skipped", needs)


@dataclass(frozen=True)
class Device:
    """What the checks look at: the configuration, and where this machine keeps what they read."""

    config: AgentConfig
    unit: str = DEFAULT_UNIT
    timeout_s: float = 5.0
    tegra_release: Path = TEGRA_RELEASE
    now: Callable[[], datetime] = utc_now

    @property
    def jetson(self) -> bool:
        return self.tegra_release.is_file()


def read_state(store: StateStore) -> UpdateState:
    """The persisted update state, read only (the agent's own load sets a corrupt file aside); an
    unreadable one reads as empty, which is what the agent then starts from."""
    try:
        return UpdateState.from_dict(json.loads(store.path.read_bytes()))
    except (OSError, ValueError, KeyError, TypeError):
        return UpdateState()


# -- the model -----------------------------------------------------------------------------------------
def serving_model(device: Device) -> Path | None:
    """The model the agent would start on: the update state's active slot, else the configured one."""
    store = StateStore(device.config.agent.state_dir)
    state = read_state(store)
    if state.active is not None and store.absolute(state.active).is_file():
        return store.absolute(state.active)
    return device.config.model.path


def check_model(device: Device) -> Iterator[Check]:
    path, model = serving_model(device), device.config.model
    if path is None:
        yield fail("model", "no model configured: set [model] path")
        return
    if not path.is_file():
        yield fail("model", f"{path} does not exist: fix [model] path or copy the model there")
        return
    if path.stat().st_size > model.budget_bytes:
        yield fail("model", f"{path} is {path.stat().st_size} bytes, over model.budget_bytes "
                            f"({model.budget_bytes})")
        return
    try:
        card = read_card(path)  # as the agent reads it: lenient, other toolchains' cards too
        backend = backend_class(backend_key_for(path, model.backend))
    except EdgecloudError as e:
        yield fail("model", str(e))
        return
    if card.get("sha256") not in (None, file_sha256(path)):
        yield fail("model", f"the card beside {path} describes another file (sha256 differs): copy the "
                            "model's own card beside it")
        return
    described = (f"{card.get('name', path.stem)} v{card['version']}" if "version" in card
                 else "no card version (served as version 0)")
    yield ok("model", f"{path} ({described}, backend {backend.key})")
    if backend.plan_target:
        yield check_engine(path)


def check_engine(engine: Path) -> Check:
    """A TensorRT engine only loads on the TensorRT release and device that built it."""
    try:
        sidecar = read_sidecar(engine)
    except EdgecloudError as e:
        return fail("engine", str(e))
    built = f"built with TensorRT {sidecar.tensorrt} on {sidecar.device!r}"
    running = installed_tensorrt_version()
    if running is None:
        return skipped("engine", f"needs TensorRT (JetPack's) to compare: the engine was {built}")
    try:
        check_compatible(sidecar, running, device_model(), engine)
    except EdgecloudError as e:
        return fail("engine", str(e))
    return ok("engine", f"{built}, as this device")


# -- the GPU -------------------------------------------------------------------------------------------
def check_gpu(device: Device) -> Check:
    if not device.jetson:
        return skipped("gpu", NEEDS_JETSON)
    present = [node for node in GPU_NODES if node.exists()]
    if not present:
        return fail("gpu", f"no GPU device node ({', '.join(map(str, GPU_NODES))}): check the JetPack "
                           "install (nvidia-l4t-core) and dmesg")
    usable = [node for node in present if os.access(node, os.R_OK | os.W_OK)]
    if not usable:
        return fail("gpu", f"{present[0]} is not readable and writable by this user: add it to the video "
                           "group (usermod -aG video USER)")
    return ok("gpu", f"{usable[0]} usable")


def check_clocks(device: Device) -> Check:
    if not device.jetson:
        return skipped("clocks", NEEDS_JETSON)
    for root in sorted(glob.glob(GPU_DEVFREQ)):
        try:
            cur, top = (int(Path(root, name).read_text()) for name in ("cur_freq", "max_freq"))
        except (OSError, ValueError):
            continue
        if cur < top:
            return warn("clocks", f"GPU at {cur // 1_000_000} of {top // 1_000_000} MHz: latency varies; "
                                  "pin it with sudo systemctl enable --now edge-agent-clocks.service")
        return ok("clocks", f"GPU at its maximum, {top // 1_000_000} MHz")
    return warn("clocks", f"no GPU frequency in {GPU_DEVFREQ}: cannot tell whether jetson_clocks ran")


# -- the network, with the configured certificates --------------------------------------------------
def cloud_model(device: Device) -> str | None:
    """The model the agent asks the cloud for: ``cloud.model``, else the edge model's served name."""
    config, path = device.config, serving_model(device)
    if config.cloud.model or config.model.name:
        return config.cloud.model or config.model.name
    try:
        return served_name(path) if path is not None and path.is_file() else None
    except EdgecloudError:
        return None


def check_cloud(device: Device) -> Check:
    """The cloud answers ModelMetadata of the agent's cloud model through the configured TLS and token
    (health alone when the model cannot be told)."""
    cloud = device.config.cloud
    if cloud.target is None:
        return skipped("cloud", "no cloud.target configured (this device never escalates)")
    name = cloud_model(device)
    fix = "check cloud.target, cloud.tls (ca, cert, key) and cloud.token_file"
    try:
        channel = open_channel(cloud.target, cloud.tls, what="cloud.target")
        metadata = bearer_metadata(cloud.token_file)
    except (ConfigError, OSError) as e:
        return fail("cloud", f"{e}: {fix}")
    with KServeClient(cloud.target, channel, metadata) as client:
        try:
            if name is not None:
                client.metadata(name, cloud.model_version, timeout=device.timeout_s)
            elif not client.serving(timeout=device.timeout_s):
                return fail("cloud", f"{cloud.target} is not serving: {fix}")
        except grpc.RpcError as e:
            return fail("cloud", f"{cloud.target}: {e.code().name} ({e.details()}): {fix}")
    how = "TLS" if cloud.tls else "plaintext"
    return ok("cloud", f"{cloud.target} answers over {how}" + (f" for model {name!r}" if name else ""))


def check_broker(device: Device) -> Check:
    config = device.config
    if config.fleet.name is None:
        return skipped("broker", "no fleet.name configured (stand-alone device)")
    mqtt = config.mqtt.model_copy(update={"client_id": f"edgecloud-doctor-{config.agent.device_id}"})
    files = {name: getattr(mqtt.tls, name) for name in ("ca", "cert", "key")} if mqtt.tls else {}
    missing = [f"mqtt.tls.{name} {path}" for name, path in files.items()
               if path is not None and not Path(path).is_file()]
    if missing:  # the TLS library would say "No such file or directory" without naming it
        return fail("broker", f"{', '.join(missing)}: no such file; fix the path")
    try:
        with MqttClient(mqtt) as client:
            client.wait_connected(device.timeout_s)
    except (MqttError, OSError) as e:
        return fail("broker", f"{e}: check mqtt.host, mqtt.port, mqtt.tls and mqtt.username")
    return ok("broker", f"{mqtt.broker} accepts this device over {'TLS' if mqtt.tls else 'plaintext'}")


# -- certificates, the clock, the disk, the unit ------------------------------------------------------
def certificate_files(config: AgentConfig) -> Iterator[tuple[str, Path]]:
    for section, tls in (("cloud.tls", config.cloud.tls), ("mqtt.tls", config.mqtt.tls)):
        for key in ("ca", "cert"):
            path = getattr(tls, key, None) if tls is not None else None
            if path is not None:
                yield f"{section}.{key}", Path(path)


def check_certificates(device: Device) -> Iterator[Check]:
    from cryptography import x509

    for key, path in certificate_files(device.config):
        name = f"certificate {key}"
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError) as e:
            yield fail(name, f"{path} is unreadable ({e}): fix {key}")
            continue
        until = min(c.not_valid_after_utc for c in certs)
        left = until - device.now()
        if left <= timedelta(0):
            yield fail(name, f"{path} expired on {format_time(until)}: renew it (edgecloud certs)")
        elif left < CERT_WARN:
            yield warn(name, f"{path} expires on {format_time(until)}, in {left.days} days: renew it soon")
        else:
            yield ok(name, f"{path} valid until {format_time(until)}")


def check_clock_sync() -> Check:
    if shutil.which("timedatectl") is None or not Path("/run/systemd/system").is_dir():
        return skipped("clock sync", "needs systemd's timedatectl")
    result = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], capture_output=True,
                            text=True, timeout=10, check=False)
    if result.stdout.strip() == "yes":
        return ok("clock sync", "synchronized (NTP)")
    return warn("clock sync", "not synchronized: release expiry is checked against this clock; "
                              "sudo timedatectl set-ntp true")


def check_clock_skew(device: Device) -> Check:
    """The clock against the newest release time this device trusted: a clock behind it is unset or
    skewed, and releases would look not yet issued or long expired."""
    state = read_state(StateStore(device.config.agent.state_dir))
    if state.newest_issued_at is None:
        return ok("clock skew", "no release trusted yet to compare with")
    newest, now = parse_time(state.newest_issued_at), device.now()
    behind = (newest - now).total_seconds()
    if behind > device.config.fleet.clock_skew_s:
        return fail("clock skew", f"the clock ({format_time(now)}) is {behind:.0f} s behind the newest "
                                  f"release this device trusted ({state.newest_issued_at}): set the time "
                                  "(sudo timedatectl set-ntp true)")
    return ok("clock skew", f"{format_time(now)}, not behind the newest trusted release")


def check_disk(device: Device) -> Check:
    config = device.config
    where = config.agent.state_dir
    existing = next(p for p in (where, *where.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    need = config.spool.max_bytes + config.telemetry.buffer_max_bytes
    mib = 1 << 20
    if free < need:
        return fail("disk", f"{free // mib} MiB free on {existing}, the spool and telemetry buffer may take "
                            f"{need // mib} MiB: free space or lower spool.max_bytes")
    return ok("disk", f"{free // mib} MiB free on {existing} for the spool and telemetry "
                      f"({need // mib} MiB at most)")


def check_unit(device: Device) -> Check:
    name = f"unit {device.unit}"
    if shutil.which("systemctl") is None or not Path("/run/systemd/system").is_dir():
        return skipped(name, "needs systemd (not running here)")

    def query(verb: str) -> str:
        return subprocess.run(["systemctl", verb, device.unit], capture_output=True, text=True, timeout=10,
                              check=False).stdout.strip()

    active, enabled = query("is-active"), query("is-enabled")
    if active != "active":
        return fail(name, f"{active or 'unknown'}: sudo systemctl enable --now {device.unit}; "
                          f"journalctl -u {device.unit} says why")
    if enabled != "enabled":
        return warn(name, f"active but {enabled or 'not enabled'}: it will not start at boot; "
                          f"sudo systemctl enable {device.unit}")
    return ok(name, "active and enabled")


def run_checks(device: Device) -> list[Check]:
    """Every check, in the order a person would fix them."""
    return [*check_model(device), check_gpu(device), check_clocks(device), check_cloud(device),
            check_broker(device), *check_certificates(device), check_clock_sync(), check_clock_skew(device),
            check_disk(device), check_unit(device)]


def run_doctor(args: argparse.Namespace) -> int:
    logging.disable(logging.WARNING)  # the report says what went wrong; the clients' own logs repeat it
    try:
        config = build(AgentConfig, read_toml(args.config), str(args.config))
        checks = run_checks(Device(config, args.unit, args.timeout))
    finally:  # as it was, for what runs next in this process
        logging.disable(logging.NOTSET)
    for check in checks:
        print(check)
    failed = [c for c in checks if c.status == "FAIL"]
    print(f"\n{len(failed)} to fix" if failed else "\nnothing to fix", file=sys.stderr)
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check this device and say what to fix, one line per check",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help=f"the agent's configuration (default {DEFAULT_CONFIG})")
    p.add_argument("--unit", default=DEFAULT_UNIT, help=f"the agent's systemd unit (default {DEFAULT_UNIT})")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long to wait for the cloud and the broker (default 5)")
    p.set_defaults(func=run_doctor)
