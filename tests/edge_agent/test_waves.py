"""Agents follow their model's wave commands (docs/design.md §12): real mosquitto, real gateway holding the
release, real agents, signed releases with waves and signed commands sent as a controller would."""

from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import ExitStack
from datetime import timedelta

import pytest

from edgecloud.clock import utc_now
from edgecloud.mqtt.topics import TopicKind
from edgecloud.release import ReleasePayload, Rollout, in_rollout, sign_release
from edgecloud.rollout import WaveCommand, public_key_b64, sign_command
from edgecloud.signing import load_private_key
from edgecloud_tools.fleet.publish import build_release
from tests.support.net import wait_for
from tests.support.update_fleet import NAME, TOPICS, Fleet, Key, Load, served_version, state_file

WAVES = (25.0, 50.0, 100.0)
SALT = "waves"


def device_in_wave(wave: int, taken: set[str]) -> str:
    """A device id inside ``WAVES[wave]`` and outside the waves before it."""
    below = WAVES[wave - 1] if wave else 0.0
    return next(d for d in (f"edge-{i}" for i in range(1000)) if d not in taken
                and in_rollout(d, WAVES[wave], SALT) and not in_rollout(d, below, SALT))


def release_with_waves(fleet: Fleet, version: int, **rollout: object) -> ReleasePayload:
    _topics, payload = build_release(fleet.request(fleet.model(version), version))
    fields = {"percent": WAVES[0], "salt": SALT, "waves": WAVES, **rollout}
    return dataclasses.replace(payload, rollout=Rollout(**fields))  # type: ignore[arg-type]


def publish(fleet: Fleet, payload: ReleasePayload) -> None:
    data = sign_release(payload, load_private_key(fleet.key.private)).to_json()
    fleet.send(TOPICS.group_desired("line-a", NAME), data)


def command(fleet: Fleet, version: int, wave: int, state: str, key: Key | None = None, reason: str = "",
            age_s: float = 0.0) -> bytes:
    """A signed wave command, ``age_s`` seconds older than now."""
    cmd = WaveCommand(model=NAME, version=version, wave=wave, state=state,  # type: ignore[arg-type]
                      issued_at=utc_now() - timedelta(seconds=age_s), reason=reason)
    return sign_command(cmd, load_private_key((key or fleet.key).private)).to_json()


def send_command(fleet: Fleet, data: bytes) -> None:
    fleet.send(TOPICS.rollout(NAME), data)


def refusals(fleet: Fleet, device: str) -> list[dict]:
    events = fleet.watcher.of(TopicKind.EVENTS, device)
    return [e["data"] for e in events if e["type"] == "rollout.command_refused"]


def test_waves_widen_the_share_and_a_halt_rolls_back_with_zero_failed_calls(fleet: Fleet) -> None:
    taken: set[str] = set()
    first = device_in_wave(0, taken)
    taken.add(first)
    second = device_in_wave(1, taken)
    last = device_in_wave(2, taken)
    agents = {d: fleet.agent(d, update={"watch_s": 60}) for d in (first, second, last)}
    publish(fleet, release_with_waves(fleet, 2))
    with ExitStack() as stack:
        loads = {d: stack.enter_context(Load(agent.port)) for d, agent in agents.items()}
        fleet.watcher.wait_report(first, "active", 2)
        loads[first].wait("2")
        assert served_version(agents[second].port) == "1" and served_version(agents[last].port) == "1"

        send_command(fleet, command(fleet, 2, 1, "advancing"))  # wave 1: 50 %
        fleet.watcher.wait_report(second, "active", 2)
        assert served_version(agents[last].port) == "1"

        # the halt cuts the 60 s watch window short and rolls both back to version 1
        send_command(fleet, command(fleet, 2, 1, "halted", reason="max_agree_drop: 0.41 below"))
        for device in (first, second):
            report = fleet.watcher.wait_report(device, "rolled_back", 2)
            assert (report["reason"], report["active_version"]) == ("rollout_halted", 1)
            halted = fleet.watcher.wait_event(device, "rollout.halted")["data"]
            assert (halted["version"], halted["wave"]) == (2, 1)
            assert halted["reason"] == "max_agree_drop: 0.41 below"
            assert fleet.watcher.status_says(device, 1)
            loads[device].wait("1", calls=loads[device].versions["1"] + 20)
            assert state_file(fleet, device)["active"] is None  # the configured model serves again
        assert fleet.watcher.reports(last) == []

        # a later advancing command (resume) brings every device in its share back
        marks = {d: len(fleet.watcher.reports(d)) for d in agents}
        send_command(fleet, command(fleet, 2, 2, "advancing"))
        for device in (first, second, last):
            fleet.watcher.wait_report(device, "active", 2, after=marks[device])
            loads[device].wait("2", calls=loads[device].versions["2"] + 20)
    assert {d: load.failures for d, load in loads.items()} == {d: [] for d in agents}
    assert all(refusals(fleet, d) == [] for d in agents)


def test_a_device_offline_during_the_halt_rolls_back_when_it_returns(fleet: Fleet) -> None:
    device = device_in_wave(0, set())
    agent = fleet.agent(device)
    publish(fleet, release_with_waves(fleet, 2))
    fleet.watcher.wait_report(device, "active", 2)
    fleet.watcher.wait_event(device, "update.watch_passed")
    agent.stop(grace=0)
    fleet.agents.remove(agent)
    send_command(fleet, command(fleet, 2, 0, "halted", reason="operator"))
    back = fleet.agent(device)  # the same state dir: it starts on version 2, then takes the halt
    fleet.watcher.wait_report(device, "rolled_back", 2)
    assert wait_for(lambda: served_version(back.port) == "1")
    assert state_file(fleet, device)["active"] is None


def _bad_signature(fleet: Fleet) -> bytes:
    envelope = json.loads(command(fleet, 2, 1, "advancing"))
    envelope["payload"]["wave"] = 2
    return json.dumps(envelope).encode()


CASES = {
    "bad_signature": _bad_signature,
    "unknown_version": lambda fleet: command(fleet, 7, 1, "advancing"),
    "outside_plan": lambda fleet: command(fleet, 2, 3, "advancing"),
    "untrusted_key": lambda fleet: command(fleet, 2, 1, "advancing", key=fleet.new_key("stranger")),
    "malformed": lambda fleet: b'{"payload": {"model": "inspection"}, "key_id": "x", "signature": "y"}',
}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_a_bad_wave_command_is_refused_with_its_reason_and_changes_nothing(fleet: Fleet, reason: str) -> None:
    inside, outside = device_in_wave(0, set()), device_in_wave(1, set())
    agents = {d: fleet.agent(d) for d in (inside, outside)}
    publish(fleet, release_with_waves(fleet, 2))
    fleet.watcher.wait_report(inside, "active", 2)
    send_command(fleet, CASES[reason](fleet))
    for device in agents:
        assert wait_for(lambda d=device: refusals(fleet, d) != []), fleet.watcher.of(TopicKind.EVENTS, device)
        assert [r["reason"] for r in refusals(fleet, device)] == [reason]
    assert served_version(agents[inside].port) == "2" and served_version(agents[outside].port) == "1"
    assert fleet.watcher.reports(outside) == []


def test_an_older_command_after_a_newer_one_is_out_of_order(fleet: Fleet, caplog) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.update")
    inside, outside = device_in_wave(0, set()), device_in_wave(1, set())
    agents = {d: fleet.agent(d) for d in (inside, outside)}
    publish(fleet, release_with_waves(fleet, 2))
    fleet.watcher.wait_report(inside, "active", 2)
    send_command(fleet, command(fleet, 2, 1, "advancing"))
    fleet.watcher.wait_report(outside, "active", 2)
    assert wait_for(lambda: caplog.text.count("event=rollout_command_taken") == 2)  # both took it
    send_command(fleet, command(fleet, 2, 0, "halted", age_s=60))  # replayed from before the advance
    for device in agents:
        assert wait_for(lambda d=device: refusals(fleet, d) != [])
        assert [r["reason"] for r in refusals(fleet, device)] == ["out_of_order"]
    assert all(served_version(agent.port) == "2" for agent in agents.values())


def test_a_release_names_the_only_key_that_drives_it(fleet: Fleet) -> None:
    controller = fleet.new_key("controller")  # not among the device's trusted keys
    device = device_in_wave(0, set())
    agent = fleet.agent(device)
    public = load_private_key(controller.private).public_key()
    publish(fleet, release_with_waves(fleet, 2, controller_key=controller.kid,
                                      controller_public_key=public_key_b64(public)))
    fleet.watcher.wait_report(device, "active", 2)
    send_command(fleet, command(fleet, 2, 0, "halted"))  # the operator's key: not this release's driver
    assert wait_for(lambda: refusals(fleet, device) != [])
    assert [r["reason"] for r in refusals(fleet, device)] == ["untrusted_key"]
    assert served_version(agent.port) == "2"
    send_command(fleet, command(fleet, 2, 0, "halted", key=controller))
    fleet.watcher.wait_report(device, "rolled_back", 2)
    assert wait_for(lambda: served_version(agent.port) == "1")


def test_a_release_without_waves_ignores_commands(fleet: Fleet) -> None:
    device = "edge-1"
    agent = fleet.agent(device)
    fleet.publish(fleet.model(2), 2)
    fleet.watcher.wait_report(device, "active", 2)
    send_command(fleet, command(fleet, 2, 0, "halted"))
    assert wait_for(lambda: refusals(fleet, device) != [])
    assert [r["reason"] for r in refusals(fleet, device)] == ["no_waves"]
    assert served_version(agent.port) == "2"
