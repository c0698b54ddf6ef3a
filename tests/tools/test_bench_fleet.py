"""``edgecloud bench --quick --only fleet`` end to end: simulated devices, real agents, the rollout
controller and a real mosquitto; every figure is in bench.json with a sane value, the wrong release is
halted and undone, the good ones are not, and the table and the plot are written. (How fast is the
bench's business, not this test's: only what must hold whatever the machine is asserted.)"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from edgecloud_tools import cli
from edgecloud_tools.rig.broker import INSTALL_HINT, mosquitto_path

pytestmark = pytest.mark.slow


def _has_controller() -> bool:
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), \
            pytest.raises(SystemExit) as done:
        cli.main(["fleet", "controller", "--help"])
    return done.value.code == 0


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory) -> tuple[dict, str, Path]:
    if mosquitto_path() is None:
        pytest.skip(f"mosquitto is not installed: {INSTALL_HINT}")
    if not _has_controller():
        pytest.skip("`edgecloud fleet controller` is not in this tree: the bench drives rollouts with it")
    tmp = tmp_path_factory.mktemp("bench-fleet")
    out = tmp / "results"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["bench", "--quick", "--only", "fleet", "--out", str(out),
                         "--workdir", str(tmp / "work"), "--peers-dir", str(tmp / "no-peers")])
    result = json.loads((out / "bench.json").read_text())
    assert code == 0, (printed.getvalue(), result.get("fleet"))
    return result, printed.getvalue(), out


def test_the_quick_fleet_bench_has_every_figure(fleet_run) -> None:
    result, table, out = fleet_run
    f = result["fleet"]
    plan = f["plan"]
    assert f["devices"] == plan["devices"] + plan["agents"]
    # every agent and every simulated device but the ones offline all along was online at the start
    assert f["online_at_start"] >= plan["agents"] + plan["devices"] * (1 - plan["offline_share"]
                                                                       - plan["flaky_share"])
    assert f["broker_messages_per_s"] > 0
    assert f["agents_on_last_release"] == plan["agents"]  # the real agents took every good release
    assert 0 < f["controller"]["cpu_percent"] < 100 * 2
    assert f["controller"]["rss_peak_bytes"] > 10e6
    good = f["good"]
    assert not good["halted"] and good["reached_all_online_s"] > 0
    assert good["timeline"]["serving"][-1][1] >= plan["agents"]
    for name in ("fleet_status", "rollout_status"):
        timing = f["status"][name]
        assert timing["exit_code"] == 0 and timing["seconds"] >= f["status"]["listen_s"], (name, timing)
    assert f["status"]["fleet_status"]["lines"] >= f["online_at_start"]
    assert "fleet:" in table and "a good release on every online device" in table
    assert (out / "fleet_rollouts.png").stat().st_size > 0


def test_the_wrong_release_is_halted_in_its_first_wave_and_undone_and_good_ones_are_not(fleet_run) -> None:
    wrong = fleet_run[0]["fleet"]["wrong"]
    assert wrong["halted"] and wrong["halted_in_wave"] == 0, wrong
    assert 0 < wrong["exposed_devices"] <= wrong["first_wave_devices"], wrong
    assert wrong["activated_after_halt"] == 0
    assert wrong["back_on_previous"] == wrong["back_within_limit"] == wrong["exposed_devices"], wrong
    assert wrong["not_back"] == []
    assert wrong["time_to_halt_s"] > 0 and wrong["back_max_s"] >= 0
    halts = fleet_run[0]["fleet"]["false_halts"]
    assert halts["runs"] == fleet_run[0]["fleet"]["plan"]["good_runs"] and halts["halted"] == 0, halts
    met = {g["name"]: g["met"] for g in fleet_run[0]["targets"] if g["name"].startswith("fleet:")}
    assert met and all(v is not None for v in met.values()), met
