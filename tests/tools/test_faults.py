"""``edgecloud faults``: the quick run plays every fault on loopback and judges each against its promise
(the measured figures are machine-dependent and not asserted; the behaviour is: every case stored,
every refusal with its code), and a promise that does not hold is reported as failed."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import pytest

from edgecloud_tools import cli
from edgecloud_tools.faults import command
from edgecloud_tools.rig.broker import mosquitto_path


def run(tmp: Path, *flags: str) -> tuple[int, dict, str]:
    out, printed = tmp / "results", io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["faults", "--quick", "--out", str(out), "--workdir", str(tmp / "work"), *flags])
    return code, json.loads((out / "faults.json").read_text()), printed.getvalue()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[int, dict, str]:
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed (the fleet faults need a broker)")
    return run(tmp_path_factory.mktemp("faults"))


def test_quick_run_plays_every_fault_with_a_verdict(quick_run) -> None:
    code, result, table = quick_run
    assert [o["fault"] for o in result["faults"]] == list(command.FAULTS)
    for o in result["faults"]:
        assert o["error"] is None, (o["fault"], o["error"])
        assert o["verdict"] in ("held", "failed") and o["checks"], o
        assert o["promise"] and o["fault"] in table
        behaviour = [c for c in o["checks"] if not c["measured"]]
        assert behaviour and all(c["held"] for c in behaviour), (o["fault"], behaviour)
    verdicts = {o["verdict"] for o in result["faults"]}
    assert code == (0 if verdicts == {"held"} else 1)
    assert result["quick"] and result["command"] == "edgecloud faults --quick"
    assert "promises held" in table


def test_quick_run_counts_cases_and_refusals(quick_run) -> None:
    _, result, _ = quick_run
    faults = {o["fault"]: o for o in result["faults"]}
    for name in ("gateway_kill", "slow_cloud", "agent_kill", "duplicate_ids", "broker_restart"):
        o = faults[name]
        assert o["expected"] > 0 and o["stored"] + o["figures"].get("spool_dropped", 0) >= o["expected"], o
    assert faults["disk_full"]["figures"]["disk"].startswith(("tmpfs", "emulated"))
    assert set(faults["bad_releases"]["figures"]["reasons"]) == {
        "forged signature", "unknown key", "expired", "not newer", "unloadable", "renamed output",
        "unreadable envelope"}
    refused = faults["identities"]["figures"]["refused"]
    assert refused["press-1's certificate with press-2's token"] == "UNAUTHENTICATED"
    assert refused["press-1 uploads a release"] == "PERMISSION_DENIED"


def test_a_promise_that_does_not_hold_is_reported_failed(tmp_path, monkeypatch) -> None:
    # no cloud answers within 0 s of the cloud's return: the reconnect promise, broken on purpose
    monkeypatch.setattr(command, "PROMISES", dataclasses.replace(command.PROMISES, reconnect_s=0.0))
    code, result, table = run(tmp_path, "--only", "reconnect")
    (o,) = result["faults"]
    assert code == 1 and o["verdict"] == "failed"
    broken = [c["what"] for c in o["checks"] if not c["held"]]
    assert broken == ["first cloud answer after the return in time"]
    assert "NOT HELD: first cloud answer after the return in time" in table
    assert result["promises"]["reconnect_s"] == 0.0
