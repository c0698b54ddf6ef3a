"""``edgecloud fleet publish|rollback|status``: sign a model release and hand it to the fleet.

Publishing uploads the model file to the gateway's release repository (or takes a URI where it
already is), hashes it, takes calibration and labels from the model card beside it
(``<file>.card.json``) with flags winning, signs the canonical payload and publishes the envelope
retained with QoS 1 on the group's or the device's desired topics: the model's own
(``models/<name>/desired``, which keeps it when the next release is for another model) and then the
one every model shares (``model/desired``, which agents that predate the topics per model follow). A
rollback is the same with
``allow_downgrade`` signed in, for an earlier version. The default rollout salt is the model name,
so the devices chosen at a given percent stay the same from release to release (a stable canary
ring); give ``--rollout-salt`` to pick another set. With ``--waves`` the release carries its staged
rollout (docs/design.md §12): the first wave is its percent, ``--soak`` and ``--gate`` say what a wave
must show, and ``--controller-key`` names the key of the controller that drives it.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import TypeAdapter, ValidationError

from edgecloud.artifacts import TransportTLS, check_name, gateway_uri, parse_uri, upload
from edgecloud.backends import backend_class, backend_key_for
from edgecloud.backends.base import Backend
from edgecloud.clock import format_time, parse_time, utc_now
from edgecloud.config import build, host_port
from edgecloud.endpoint import parse_endpoint
from edgecloud.errors import ConfigError, EdgecloudError, ModelLoadError
from edgecloud.files import file_sha256
from edgecloud.modelcard import ModelCardError, read_card
from edgecloud.mqtt.client import MqttClient, MqttConfig
from edgecloud.mqtt.fleet_view import FleetView
from edgecloud.mqtt.topics import FleetTopics, Topic, TopicKind
from edgecloud.release import (
    GATE_KEYS,
    Artifact,
    Calibration,
    Envelope,
    PlanTarget,
    ReleasePayload,
    ReleaseRejected,
    Rollout,
    sign_release,
)
from edgecloud.rollout import public_key_b64
from edgecloud.signing import key_id, load_private_key, load_public_key
from edgecloud_tools.fleet.status import collect, render_releases, render_table

DEFAULT_EXPIRY = timedelta(days=30)
CALIBRATION_KEYS = ("policy", "temperature", "threshold", "score_output", "scores")
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
#: modules that add actions to ``edgecloud fleet`` (each has ``register(actions)``), after these here
FLEET_ACTION_MODULES = ("edgecloud_tools.fleet.rollout_cli", "edgecloud_tools.fleet.simulate")
#: the flag that sets each key of ``rollout``, for error messages
_ROLLOUT_FLAGS = {"percent": "--rollout-percent", "salt": "--rollout-salt", "waves": "--waves",
                  "gates": "--gate", "controller_key": "--controller-key",
                  "controller_public_key": "--controller-key"}
_ROLLOUT = TypeAdapter(Rollout)
PASSWORD_ENV = "EDGECLOUD_MQTT_PASSWORD"
TOKEN_ENV = "EDGECLOUD_GATEWAY_TOKEN"


@dataclass(frozen=True)
class ReleaseRequest:
    """What to publish and to whom; exactly one of group/device and one of gateway/uri."""

    model: Path
    name: str
    version: int
    key: Path
    fleet: str
    group: str | None = None
    device: str | None = None
    gateway: str | None = None  # HOST:PORT of the gateway's artifact service
    gateway_tls: TransportTLS | None = None
    gateway_token: str | None = None
    uri: str | None = None
    rollout_percent: float = 100.0
    rollout_salt: str | None = None
    waves: tuple[float, ...] | None = None  # with waves the first is the percent
    gates: Mapping[str, float] = field(default_factory=dict)  # keys of edgecloud.release.Gates
    controller_key: Ed25519PublicKey | None = None
    expires_at: datetime | None = None  # default: issued_at + 30 days
    calibration: Mapping[str, Any] = field(default_factory=dict)  # flags; win over the model card
    publisher: str | None = None
    allow_downgrade: bool = False
    plan_target: PlanTarget | None = None


@dataclass(frozen=True)
class Published:
    topics: tuple[Topic, ...]
    envelope: Envelope


def parse_duration(text: str) -> timedelta | None:
    """``30d``, ``12h``, ``90m``, ``3600s``; None for anything else."""
    m = _DURATION.match(text)
    return timedelta(**{_UNITS[m.group(2)]: int(m.group(1))}) if m else None


def parse_expires(text: str, now: datetime) -> datetime:
    """``30d``, ``12h``, ``90m``, ``3600s`` from ``now``, or an RFC 3339 time."""
    if (duration := parse_duration(text)) is not None:
        return now + duration
    try:
        return parse_time(text)
    except ValueError:
        raise ConfigError(f"--expires {text!r}: give a duration like 30d, 12h, 90m, "
                          "or an RFC 3339 time") from None


def default_publisher() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = "edgecloud"
    return f"{user}@{socket.gethostname()}"


def _target_topics(request: ReleaseRequest) -> tuple[Topic, Topic]:
    """The model's own desired topic of the group or device, and the one its models share."""
    if (request.group is None) == (request.device is None):
        raise ConfigError("give exactly one of --group or --device")
    try:
        topics = FleetTopics(request.fleet)
        desired = topics.device_desired if request.device is not None else topics.group_desired
        target = request.device if request.device is not None else request.group or ""
        return desired(target, request.name), desired(target)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _artifact_uri(request: ReleaseRequest, sha256: str, artifact_format: str) -> str:
    if (request.gateway is None) == (request.uri is None):
        raise ConfigError("give exactly one of --gateway or --uri")
    if request.uri is not None:
        try:
            parse_uri(request.uri)
        except ReleaseRejected as e:
            raise ConfigError(f"--uri: {e.detail}") from None
        return request.uri
    try:
        endpoint = parse_endpoint(request.gateway or "")
        upload(endpoint, request.model, name=request.name, version=request.version,
               artifact_format=artifact_format, fleet=request.fleet, sha256=sha256,
               tls=request.gateway_tls, token=request.gateway_token)
    except ValueError as e:
        raise ConfigError(f"--gateway/--name: {e}") from None
    except grpc.RpcError as e:
        raise EdgecloudError(f"upload to gateway {request.gateway} failed: "
                             f"{e.code().name}: {e.details()}") from None
    return gateway_uri(request.gateway or "", request.name, request.version,
                       tls=request.gateway_tls is not None)


def build_rollout(request: ReleaseRequest) -> Rollout:
    """The release's rollout from the request, checked as a device parses it; ConfigError naming the
    flag of the first bad value."""
    data: dict[str, Any] = {"percent": request.rollout_percent, "salt": request.rollout_salt or request.name}
    if request.waves is not None:
        data.update(waves=list(request.waves), percent=request.waves[0] if request.waves else 0)
    if request.gates:
        data["gates"] = dict(request.gates)
    if request.controller_key is not None:
        data.update(controller_key=key_id(request.controller_key),
                    controller_public_key=public_key_b64(request.controller_key))
    try:
        return _ROLLOUT.validate_python(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        loc = [str(part) for part in first["loc"]]
        flag = f"--gate {loc[1]}" if loc[0] == "gates" and len(loc) > 1 else _ROLLOUT_FLAGS.get(loc[0], "")
        raise ConfigError(f"{flag}: rollout.{'.'.join(loc)}: {first['msg']}") from None
    except ReleaseRejected as e:
        raise ConfigError(f"{'--waves' if request.waves else '--rollout-percent'}: {e.detail}") from None


def _shipped_backend(model: Path) -> type[Backend]:
    """The backend whose releases carry ``model``, chosen by its file suffix."""
    try:
        backend = backend_class(backend_key_for(model))
    except ModelLoadError as e:
        raise ConfigError(f"--model {e}") from None
    if backend.release_format is None:
        raise ConfigError(f"--model {model}: backend {backend.key} cannot be shipped in a release")
    return backend


def build_release(request: ReleaseRequest,
                  now: datetime | None = None) -> tuple[tuple[Topic, ...], ReleasePayload]:
    """Check the request, upload the artifact if needed, and assemble the payload to sign; with the
    topics to publish it on, in order."""
    try:
        check_name(request.name)
    except ValueError as e:
        raise ConfigError(f"--name: {e}") from None
    topics = _target_topics(request)
    if request.version < 0:
        raise ConfigError(f"--version {request.version}: must be >= 0")
    if not request.model.is_file():
        raise ConfigError(f"--model {request.model}: no such file")
    backend = _shipped_backend(request.model)
    if backend.plan_target and request.plan_target is None:
        raise ConfigError(f"--model {request.model} is a TensorRT plan: "
                          "give --tensorrt-version and --target-device")
    if request.plan_target is not None and not backend.plan_target:
        raise ConfigError(f"--model {request.model} is not a plan: --tensorrt-version and "
                          "--target-device are for plans only")
    try:
        card = read_card(request.model)
    except ModelCardError as e:
        raise ConfigError(str(e)) from None
    values = {k: (card.get("calibration") or {}).get(k) for k in CALIBRATION_KEYS}
    values.update({k: v for k, v in request.calibration.items() if v is not None})
    labels = card.get("labels")
    issued_at = now or utc_now()
    if request.expires_at is not None and request.expires_at <= issued_at:
        raise ConfigError(f"--expires {format_time(request.expires_at)} is not in the future")
    try:  # everything that can be wrong with the request, before uploading anything
        calibration = Calibration.from_dict(values)
    except ReleaseRejected as e:
        raise ConfigError(e.detail) from None
    rollout = build_rollout(request)
    sha256, size = file_sha256(request.model), request.model.stat().st_size
    artifact_format = backend.release_format
    uri = _artifact_uri(request, sha256, artifact_format)
    try:
        payload = ReleasePayload(
            model=request.name, version=request.version, publisher=request.publisher or default_publisher(),
            artifact=Artifact(uri, sha256, size, artifact_format, request.plan_target),
            issued_at=issued_at, expires_at=request.expires_at or issued_at + DEFAULT_EXPIRY,
            calibration=calibration, rollout=rollout, labels=tuple(labels) if labels else None,
            allow_downgrade=request.allow_downgrade)
    except ReleaseRejected as e:
        raise ConfigError(e.detail) from None
    return topics, payload


def publish_release(request: ReleaseRequest, mqtt: MqttConfig, *, now: datetime | None = None,
                    timeout_s: float = 10.0) -> Published:
    """Sign and publish ``request`` (retained, QoS 1); returns where and what was published."""
    key = load_private_key(request.key)  # fail on a bad key before uploading anything
    topics, payload = build_release(request, now)
    envelope = sign_release(payload, key)
    with MqttClient(mqtt) as client:
        client.wait_connected(timeout_s)
        for topic in topics:  # the same bytes: a device takes them once
            client.publish(topic, envelope.to_json(), qos=1, retain=True, timeout=timeout_s)
    return Published(topics, envelope)


# -- command line -----------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    fleet = subparsers.add_parser("fleet", help="publish signed model releases, roll back, watch devices")
    actions = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    publish = actions.add_parser("publish", help="sign and publish a model release",
                                 description="Upload, sign and publish a release (retained, QoS 1).")
    _release_arguments(publish)
    publish.set_defaults(func=run_publish, allow_downgrade=False)
    rollback = actions.add_parser("rollback", help="publish a signed downgrade to an earlier version",
                                  description="Like publish, with allow_downgrade signed in: give the "
                                              "earlier model file and its version.")
    _release_arguments(rollback)
    rollback.set_defaults(func=run_publish, allow_downgrade=True)
    status = actions.add_parser("status", help="show devices and desired releases from their retained topics",
                                description="Listen to status, reported, telemetry and desired topics "
                                            "and print the devices and the releases retained for them "
                                            "(active, pending, rolled back or failed on which devices).")
    mqtt_arguments(status)
    status.add_argument("--wait", type=float, default=1.0, metavar="SECONDS",
                        help="how long to collect messages (default 1: the retained ones arrive at "
                             "once; telemetry, every device's interval_s)")
    status.set_defaults(func=run_status)
    clear = actions.add_parser("clear", help="remove the release retained for a group or a device",
                               description="Publish an empty retained message on the desired topics "
                                           "(each model's own and the shared one): a device cleared "
                                           "follows its group's release again.")
    target = clear.add_mutually_exclusive_group(required=True)
    target.add_argument("--group", help="the group whose desired release goes")
    target.add_argument("--device", help="the device whose own desired release goes")
    clear.add_argument("--model", help="only this model's release (default: every model's)")
    clear.add_argument("--wait", type=float, default=1.0, metavar="SECONDS",
                       help="how long to listen for the releases retained (default 1)")
    mqtt_arguments(clear)
    clear.set_defaults(func=run_clear)
    for name in FLEET_ACTION_MODULES:
        importlib.import_module(name).register(actions)


def mqtt_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The broker options every fleet action takes (``required=False`` where a config file may give
    them)."""
    group = parser.add_argument_group("broker")
    group.add_argument("--mqtt", required=required, metavar="HOST:PORT", help="the fleet's MQTT broker")
    group.add_argument("--fleet", required=required, help="fleet id (topic level edgecloud/<fleet>/…)")
    group.add_argument("--mqtt-username", help=f"user name; the password is read from ${PASSWORD_ENV}")
    group.add_argument("--mqtt-ca", type=Path, help="CA of the broker's certificate (enables TLS)")
    group.add_argument("--mqtt-cert", type=Path, help="client certificate for mutual TLS")
    group.add_argument("--mqtt-key", type=Path, help="client key for mutual TLS")
    group.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                       help="how long to wait for the broker (and its acknowledgement), default 10")


def _release_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, metavar="FILE", help=".onnx (or .plan) file")
    parser.add_argument("--name", required=True, help="model name the devices serve")
    parser.add_argument("--version", required=True, type=int, help="release version (integer)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--group", help="publish to every device of this group")
    target.add_argument("--device", help="publish to one device (wins over its group)")
    parser.add_argument("--key", required=True, type=Path, help="Ed25519 private key (edgecloud keygen)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gateway", metavar="HOST:PORT", help="upload to this gateway's repository")
    source.add_argument("--uri", help="the file is already at this grpc(s)://, https:// or file:// URI")
    parser.add_argument("--gateway-ca", type=Path, help="CA of the gateway's certificate (grpcs)")
    parser.add_argument("--gateway-cert", type=Path, help="client certificate for the gateway (mutual TLS)")
    parser.add_argument("--gateway-key", type=Path, help="client key for the gateway (mutual TLS)")
    parser.add_argument("--rollout-percent", type=float, default=100.0, metavar="P",
                        help="0-100 (default 100)")
    parser.add_argument("--rollout-salt", help="rollout hash salt (default: the model name)")
    waves = parser.add_argument_group("staged rollout (docs/design.md §12)")
    waves.add_argument("--waves", type=_waves, metavar="P1,P2,…,100",
                       help="increasing percents ending at 100; the first replaces --rollout-percent")
    waves.add_argument("--soak", metavar="DURATION", help="how long each wave runs before it is judged "
                       "(10m, 1h, 600s): gate soak_s")
    waves.add_argument("--gate", action="append", default=[], metavar="KEY=VALUE",
                       help=f"a gate, repeatable; keys: {', '.join(k for k in GATE_KEYS if k != 'soak_s')}")
    waves.add_argument("--controller-key", type=Path, metavar="PUBLIC_KEY_PEM",
                       help="the only key allowed to sign this release's wave commands (carried in it)")
    parser.add_argument("--expires", default="30d", help="duration (30d, 12h) or RFC 3339 time (default 30d)")
    parser.add_argument("--publisher", help="who publishes (default: user@host)")
    cal = parser.add_argument_group("calibration (default: the model card's)")
    cal.add_argument("--policy", help="max_prob | margin | entropy | package.module:function")
    cal.add_argument("--threshold", type=float, help="escalate when confidence < threshold")
    cal.add_argument("--temperature", type=float, help="softmax temperature")
    cal.add_argument("--score-output", help="output holding the class scores")
    cal.add_argument("--scores", choices=("logits", "probabilities"))
    plan = parser.add_argument_group("TensorRT plan releases")
    plan.add_argument("--tensorrt-version", help="TensorRT version the plan was built with")
    plan.add_argument("--target-device", help="device model the plan was built on")
    mqtt_arguments(parser)


def _waves(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated percents."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated percents like 5,25,100") from None


def parse_gates(soak: str | None, gates: list[str]) -> dict[str, float]:
    """``--soak`` and ``--gate KEY=VALUE`` flags as the keys of ``rollout.gates``; ConfigError naming the
    flag of a bad one (the values' ranges are checked with the rollout)."""
    out: dict[str, float] = {}
    if soak is not None:
        duration = parse_duration(soak)
        if duration is None:
            raise ConfigError(f"--soak {soak!r}: give a duration like 10m, 1h or 600s")
        out["soak_s"] = duration.total_seconds()
    for item in gates:
        name, sep, value = item.partition("=")
        if not sep or name not in GATE_KEYS or name == "soak_s":
            keys = ", ".join(k for k in GATE_KEYS if k != "soak_s")
            raise ConfigError(f"--gate {item!r}: give KEY=VALUE with KEY one of {keys} (soak: --soak)")
        try:
            out[name] = int(value) if name == "min_devices" else float(value)
        except ValueError:
            raise ConfigError(f"--gate {name}: {value!r} is not a number") from None
    return out


def mqtt_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``[mqtt]`` keys the broker options give (none for options left out)."""
    data: dict[str, Any] = host_port("--mqtt", args.mqtt) if args.mqtt else {}
    if args.mqtt_username:
        data["username"] = args.mqtt_username
        data["password"] = os.environ.get(PASSWORD_ENV)
    if args.mqtt_ca or args.mqtt_cert:
        data["tls"] = {"ca": args.mqtt_ca, "cert": args.mqtt_cert, "key": args.mqtt_key}
    return data


def mqtt_config_from_args(args: argparse.Namespace) -> MqttConfig:
    return build(MqttConfig, mqtt_overrides(args), source="--mqtt options")


def _gateway_tls(args: argparse.Namespace) -> TransportTLS | None:
    if not (args.gateway_ca or args.gateway_cert):
        return None
    return TransportTLS(ca=args.gateway_ca, cert=args.gateway_cert, key=args.gateway_key)


def run_publish(args: argparse.Namespace) -> int:
    now = utc_now()
    plan_target = None
    if args.tensorrt_version or args.target_device:
        if not (args.tensorrt_version and args.target_device):
            raise ConfigError("give --tensorrt-version and --target-device together")
        plan_target = PlanTarget(args.tensorrt_version, args.target_device)
    controller_key = None
    if args.controller_key is not None:
        try:
            controller_key = load_public_key(args.controller_key)
        except ConfigError as e:
            raise ConfigError(f"--controller-key: {e}") from None
    request = ReleaseRequest(
        model=args.model, name=args.name, version=args.version, key=args.key, fleet=args.fleet,
        group=args.group, device=args.device, gateway=args.gateway, gateway_tls=_gateway_tls(args),
        gateway_token=os.environ.get(TOKEN_ENV), uri=args.uri, rollout_percent=args.rollout_percent,
        rollout_salt=args.rollout_salt, waves=args.waves, gates=parse_gates(args.soak, args.gate),
        controller_key=controller_key, expires_at=parse_expires(args.expires, now),
        calibration={k: getattr(args, k) for k in CALIBRATION_KEYS}, publisher=args.publisher,
        allow_downgrade=args.allow_downgrade, plan_target=plan_target)
    published = publish_release(request, mqtt_config_from_args(args), now=now, timeout_s=args.timeout)
    payload = published.envelope.payload
    print(f"published {payload['model']} v{payload['version']} to {' and '.join(map(str, published.topics))} "
          f"(key {published.envelope.key_id}, sha256 {payload['artifact']['sha256'][:12]}…, "
          f"{payload['artifact']['size']} bytes, uri {payload['artifact']['uri']}, "
          f"expires {payload['expires_at']}{', downgrade allowed' if request.allow_downgrade else ''})")
    return 0


def run_status(args: argparse.Namespace) -> int:
    view = collect(mqtt_config_from_args(args), args.fleet, listen_s=args.wait,
                   connect_timeout_s=args.timeout)
    rows, releases = view.sorted_rows(), view.releases()
    print(render_table(rows) if rows else f"no devices have reported in fleet {args.fleet}")
    print()
    print(render_releases(releases) if releases else f"no release is retained in fleet {args.fleet}")
    return 0


def clear_release(mqtt: MqttConfig, topics: list[Topic], timeout_s: float = 10.0) -> None:
    """Remove the releases retained on desired ``topics`` (an empty retained message each): a device
    then follows its group's release again, a group's devices keep what they serve."""
    with MqttClient(mqtt) as client:
        client.wait_connected(timeout_s)
        for topic in topics:
            client.publish(topic, b"", qos=1, retain=True, timeout=timeout_s)


def cleared_topics(view: FleetView, group: str | None, device: str | None, model: str | None) -> list[Topic]:
    """The desired topics ``fleet clear`` empties, from what ``view`` saw retained: with ``model``,
    that model's own topic, and the shared topic while it holds that model's release; without, the
    shared topic and every model's own."""
    is_group, name = group is not None, group if group is not None else device or ""
    desired = view.topics.group_desired if is_group else view.topics.device_desired
    held = {t.model: d for t, d in view.desired.items() if (t.group, t.name) == (is_group, name)}
    if model is not None:
        shared = held.get("")
        return [desired(name, model), *([desired(name)] if shared and shared.model == model else [])]
    return [desired(name), *(desired(name, m) for m in sorted(held) if m)]


def run_clear(args: argparse.Namespace) -> int:
    mqtt = mqtt_config_from_args(args)
    group = args.group is not None
    name = args.group if group else args.device
    try:  # a bad id fails before the broker is asked
        cleared_topics(FleetView(args.fleet), args.group, args.device, args.model)
        kinds = ((TopicKind.GROUP_DESIRED, TopicKind.GROUP_MODEL_DESIRED) if group
                 else (TopicKind.DEVICE_DESIRED, TopicKind.DEVICE_MODEL_DESIRED))
        held = [FleetTopics(args.fleet).every(kind, name) for kind in kinds]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    view = collect(mqtt, args.fleet, listen_s=args.wait, connect_timeout_s=args.timeout, filters=held)
    topics = cleared_topics(view, args.group, args.device, args.model)
    clear_release(mqtt, topics, timeout_s=args.timeout)
    for topic in topics:
        print(f"cleared the release retained on {topic}")
    return 0
