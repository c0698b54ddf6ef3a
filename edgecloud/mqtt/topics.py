"""Every MQTT topic of the fleet (docs/design.md §8), built and validated in one place.

:class:`Topic` is a concrete name to publish on, :class:`Wildcard` a filter to subscribe with; both
validate on construction, so a bad fleet or device id fails where it is configured, not at the broker.
:class:`FleetTopics` builds them, :func:`FleetTopics.parse` maps a received topic back to its kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

ROOT = "edgecloud"
#: ids used as one topic level: fleet, device and group names
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_MAX_TOPIC_BYTES = 65535


def check_id(kind: str, value: str) -> str:
    """Return ``value`` if it is a safe single topic level (and file name); ValueError otherwise."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise ValueError(f"{kind} id {value!r} is invalid: use 1-128 of A-Z a-z 0-9 . _ : - "
                         "starting with a letter or digit")
    return value


def _check_common(value: str) -> None:
    if not value:
        raise ValueError("topic must not be empty")
    if "\x00" in value:
        raise ValueError(f"topic {value!r} contains a NUL character")
    if len(value.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise ValueError(f"topic is longer than {_MAX_TOPIC_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class Topic:
    """A topic name to publish on: no wildcards."""

    value: str

    def __post_init__(self) -> None:
        _check_common(self.value)
        if "+" in self.value or "#" in self.value:
            raise ValueError(f"topic {self.value!r} contains a wildcard (+ or #); use Wildcard to subscribe")

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Wildcard:
    """A topic filter to subscribe with: ``+`` fills one whole level, ``#`` only the last one."""

    value: str

    def __post_init__(self) -> None:
        _check_common(self.value)
        levels = self.value.split("/")
        for i, level in enumerate(levels):
            if "+" in level and level != "+":
                raise ValueError(f"wildcard {self.value!r}: '+' must fill a whole level")
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise ValueError(f"wildcard {self.value!r}: '#' must be the whole last level")

    def matches(self, topic: Topic | str) -> bool:
        """Whether ``topic`` is delivered to a subscription with this filter (MQTT §4.7)."""
        names = str(topic).split("/")
        filters = self.value.split("/")
        for i, f in enumerate(filters):
            if f == "#":
                return True
            if i >= len(names) or (f != "+" and f != names[i]):
                return False
        return len(names) == len(filters)

    def __str__(self) -> str:
        return self.value


class TopicKind(Enum):
    """The topics of docs/design.md §8 with their retain flag and QoS."""

    STATUS = ("devices", "status", True)
    TELEMETRY = ("devices", "telemetry", False)
    EVENTS = ("devices", "events", False)
    DEVICE_DESIRED = ("devices", "model/desired", True)
    REPORTED = ("devices", "model/reported", True)
    GROUP_DESIRED = ("groups", "model/desired", True)
    #: one retained release per model, so a release for one model does not replace another's
    DEVICE_MODEL_DESIRED = ("devices", "models/+/desired", True)
    GROUP_MODEL_DESIRED = ("groups", "models/+/desired", True)
    #: one retained update report per model, so one model's report does not replace another's
    MODEL_REPORTED = ("devices", "models/+/reported", True)
    #: the signed wave command of a model's rollout (docs/design.md §12): the name is the model's
    ROLLOUT = ("models", "rollout", True)

    def __init__(self, scope: str, suffix: str, retained: bool) -> None:
        self.scope = scope
        self.suffix = suffix
        self.retained = retained

    @property
    def per_model(self) -> bool:
        """Whether the topic has a level naming the model (``+`` in :attr:`suffix`)."""
        return "+" in self.suffix.split("/")

    @property
    def desired(self) -> bool:
        return self.suffix.endswith("/desired")

    @property
    def qos(self) -> int:
        return 1


#: what the level after a scope names
_ID_KINDS = {"devices": "device", "groups": "group", "models": "model"}


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """What a received topic is about: its kind and the device or group it names."""

    kind: TopicKind
    fleet: str
    device: str = ""
    group: str = ""
    model: str = ""


@dataclass(frozen=True, slots=True)
class FleetTopics:
    """Topic names of one fleet: ``edgecloud/{fleet}/devices/{device}/…`` and ``…/groups/{group}/…``."""

    fleet: str

    def __post_init__(self) -> None:
        check_id("fleet", self.fleet)

    def topic(self, kind: TopicKind, name: str, model: str = "") -> Topic:
        """The topic of ``kind`` for device (or group, or model, by the kind's scope) ``name``;
        ``model`` fills the model level of a per-model kind."""
        check_id(_ID_KINDS[kind.scope], name)
        suffix = kind.suffix.replace("+", check_id("model", model)) if kind.per_model else kind.suffix
        return Topic(f"{ROOT}/{self.fleet}/{kind.scope}/{name}/{suffix}")

    def every(self, kind: TopicKind, name: str = "+") -> Wildcard:
        """The filter matching ``kind`` for every device (or group) of the fleet, or for ``name``'s
        alone (of every model, for a per-model kind)."""
        if name != "+":
            check_id(_ID_KINDS[kind.scope], name)
        return Wildcard(f"{ROOT}/{self.fleet}/{kind.scope}/{name}/{kind.suffix}")

    def status(self, device: str) -> Topic:
        return self.topic(TopicKind.STATUS, device)

    def telemetry(self, device: str) -> Topic:
        return self.topic(TopicKind.TELEMETRY, device)

    def events(self, device: str) -> Topic:
        return self.topic(TopicKind.EVENTS, device)

    def reported(self, device: str, model: str = "") -> Topic:
        """The device's update report: ``model``'s own, or the one its models share."""
        if model:
            return self.topic(TopicKind.MODEL_REPORTED, device, model)
        return self.topic(TopicKind.REPORTED, device)

    def device_desired(self, device: str, model: str = "") -> Topic:
        """The device's desired topic: its own for ``model``, or the one every model shares."""
        if model:
            return self.topic(TopicKind.DEVICE_MODEL_DESIRED, device, model)
        return self.topic(TopicKind.DEVICE_DESIRED, device)

    def group_desired(self, group: str, model: str = "") -> Topic:
        """The group's desired topic: its own for ``model``, or the one every model shares."""
        if model:
            return self.topic(TopicKind.GROUP_MODEL_DESIRED, group, model)
        return self.topic(TopicKind.GROUP_DESIRED, group)

    def rollout(self, model: str) -> Topic:
        """Where ``model``'s wave commands are retained."""
        return self.topic(TopicKind.ROLLOUT, model)

    def parse(self, topic: Topic | str) -> ParsedTopic | None:
        """Map a topic of this fleet back to its kind and id; None for anything else."""
        levels = str(topic).split("/")
        if len(levels) < 5 or levels[0] != ROOT or levels[1] != self.fleet:
            return None
        scope, name, suffix = levels[2], levels[3], levels[4:]
        if not ID_PATTERN.match(name):
            return None
        for kind in TopicKind:
            want = kind.suffix.split("/")
            if kind.scope != scope or len(want) != len(suffix):
                continue
            pairs = list(zip(suffix, want))
            model = "".join(got for got, w in pairs if w == "+")
            if any(w not in ("+", got) for got, w in pairs) or (kind.per_model
                                                                 and not ID_PATTERN.match(model)):
                continue
            where = {"model": model, _ID_KINDS[scope]: name}
            return ParsedTopic(kind, self.fleet, **where)
        return None
