"""``edgecloud bench``: the quick run end to end (every stage measured and written, each figure beside its
baseline, the targets as rows; the figures themselves are machine-dependent and not asserted), and the
harness's parts: the delay proxy, the loopback-only clients, peers that are not installed, the targets."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from edgecloud_tools import cli
from edgecloud_tools.bench.peers import FASTAPI, Peer, peer_python
from edgecloud_tools.bench.report import format_table
from edgecloud_tools.bench.targets import Goal, goals
from edgecloud_tools.rig import loadgen
from edgecloud_tools.rig.delay_proxy import DelayProxy

STAGES = ("floors", "agent", "peers", "gateway", "slow_cloud", "cascade", "frames", "cold_start")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, str, Path]:
    """One quick run shared by the tests below: its JSON, what it printed, where it wrote."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["bench", "--quick", "--out", str(out), "--workdir", str(tmp / "work"),
                         "--peers-dir", str(tmp / "no-peers")])
    assert code == 0, printed.getvalue()
    return json.loads((out / "bench.json").read_text()), printed.getvalue(), out


def test_quick_run_measures_every_stage(quick_run) -> None:
    result, _, _ = quick_run
    for stage in STAGES:
        assert "error" not in result[stage], f"stage {stage} failed: {result[stage]}"
    floors = result["floors"]
    assert set(floors["in_process"]) == {"edge INT8", "edge INT8, 1 intra-op thread", "edge FP32",
                                         "cloud FP32"}
    for model in floors["in_process"].values():
        assert model["rows_per_s"] > 0 and 0 < model["batch1"]["p50_ms"] <= model["batch1"]["p99_ms"]
    plan = result["plan"]
    for kind, counts in (("kserve", {*plan["concurrency"], *plan["streams"]}), ("bare", plan["concurrency"]),
                         ("model", plan["concurrency"]), ("cloud_model", plan["streams"])):
        for n in counts:
            point = floors["echo"][kind][str(n)]
            assert point["ok"] > 0 and point["errors"] == {}, (kind, n, point)
    for n in plan["concurrency"]:
        assert result["agent"]["closed"][str(n)]["ok"] > 0
    # the server's CPU per call: some, and more for the agent than for the echo, which does nothing
    cpu = {**floors["echo"]["cpu_us_per_call"], "agent": result["agent"]["cpu_us_per_call"]}
    assert all(value and value > 0 for value in cpu.values()), cpu
    assert cpu["agent"] > cpu["kserve"], cpu
    for n in plan["streams"]:
        for key in ("batching", "no_batching"):
            point = result["gateway"][key]["closed"][str(n)]
            assert point["ok"] > 0 and point["errors"] == {}, (key, n, point)


def test_open_loop_accounts_for_every_call_it_sent(quick_run) -> None:
    result, _, _ = quick_run
    agent = result["agent"]
    assert set(agent["open"]) == {"1.5", "3"}
    for o in agent["open"].values():
        assert o["rate_per_s"] == pytest.approx(o["factor"] * agent["capacity_per_s"], rel=1e-3)
        assert o["issued"] == o["answered"] + o["shed"] + o["other_errors"] > 0
        assert o["rss_peak_bytes"] >= o["rss_before_bytes"] > 0


def test_peers_without_a_venv_are_reported_not_installed(quick_run) -> None:
    result, table, _ = quick_run
    peers = result["peers"]
    for peer in (peers["fastapi"], peers["mlserver"], result["gateway"]["mlserver_adaptive"]):
        assert peer["status"].startswith("not installed") and "closed" not in peer
    assert "not installed" in table
    by_name = {g["name"]: g for g in result["targets"]}
    assert by_name["agent calls/s at 16 clients >= 3x FastAPI"]["met"] is None


def test_slow_cloud_and_cascade_go_through_the_delay_proxy(quick_run) -> None:
    result, _, _ = quick_run
    slow = result["slow_cloud"]
    assert slow["escalations"]["ok"] > 0 and slow["edge_only_alone"]["ok"] > 0
    assert slow["edge_only_beside_escalations"]["ok"] > 0
    modes = result["cascade"]["modes"]
    images = result["cascade"]["images"]
    assert all(m["n"] == images for m in modes.values())
    assert modes["cloud only"]["to_cloud"] == 1.0 and modes["edge only"]["to_cloud"] == 0.0
    assert 0 < modes["cascade"]["to_cloud"] < 1
    # only the rows that went to the cloud cross the WAN
    upstream = [modes[m]["upstream_bytes"] for m in ("edge only", "cascade", "cloud only")]
    assert upstream == sorted(upstream) and len(set(upstream)) == 3, upstream
    assert modes["cloud only"]["accuracy"] >= modes["edge only"]["accuracy"]
    assert modes["cloud only"]["mean_ms"] >= result["cascade"]["wan_ms"]


def test_frames_stage_measures_decoding_the_agent_and_the_uplink(quick_run) -> None:
    frames = quick_run[0]["frames"]
    n = quick_run[0]["plan"]["frames"]
    assert frames["in_process"]["frame"]["size"] == [480, 640]
    for part in ("decode_preprocess", "model"):
        assert frames["in_process"][part]["n"] == n and frames["in_process"][part]["p50_ms"] > 0
    assert frames["agent"]["clients"] == 4 and frames["agent"]["ok"] > 0 and frames["agent"]["errors"] == {}
    up = frames["upstream"]
    assert up["frame"]["rows"] == up["tensor"]["rows"] == n
    assert up["frame"]["bytes_per_row"] > 0 and up["tensor"]["bytes_per_row"] > 0
    assert "upstream bytes per escalated row: original frame" in quick_run[1]


def test_quick_run_prints_the_table_and_writes_plots_or_says_why_not(quick_run) -> None:
    result, table, out = quick_run
    assert result["cold_start"]["ready_s"] > 0 and result["cold_start"]["rss_bytes"] > 0
    assert len(result["targets"]) == 11 and all(t["met"] in (True, False, None) for t in result["targets"])
    for heading in ("models:", "agent, floors and peers:", "admission:", "gateway:", "slow cloud:",
                    "cascade:", "frames:", "start-up:", "targets:"):
        assert heading in table
    assert result["machine"]["cores"] > 0 and result["machine"]["onnxruntime"] in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plots: matplotlib is not installed" in table
    else:
        for name in ("latency_cdf.png", "throughput.png", "slow_cloud.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_delay_proxy_adds_its_round_trip_and_counts_bytes_each_way() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def echo() -> None:
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

        threading.Thread(target=echo, daemon=True).start()
        with DelayProxy(server.getsockname()[1], rtt_ms=200) as proxy, \
                socket.create_connection(("127.0.0.1", proxy.port)) as client:
            payload = bytes(range(256)) * 40
            started = time.monotonic()
            client.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += client.recv(65536)
            elapsed = time.monotonic() - started
    assert got == payload, "the proxy reordered or changed bytes"
    assert elapsed >= 0.2, "the proxy did not add its round trip"
    assert proxy.upstream_bytes == proxy.downstream_bytes == len(payload)


def test_clients_refuse_any_target_but_loopback() -> None:
    assert loadgen._loopback("127.0.0.1:8001") == "127.0.0.1:8001"
    with pytest.raises(SystemExit, match=r"only 127\.0\.0\.1"):
        loadgen._loopback("bench.invalid:8001")


def test_a_peer_that_cannot_be_installed_is_reported_not_a_failure(tmp_path: Path) -> None:
    assert peer_python(FASTAPI, tmp_path, make=False)[0] is None
    broken = Peer("broken", "a peer whose requirement is no package", (str(tmp_path / "no-such-project"),))
    python, status = peer_python(broken, tmp_path, make=True)
    assert python is None and status.startswith("not installed (CalledProcessError")
    assert not broken.venv(tmp_path).exists(), "a half-made venv was left behind"


def test_targets_compare_ratios_and_say_na_without_a_baseline() -> None:
    assert Goal("x", 2.0, 1.0, "<=", 1.25, "ms").met is False
    assert Goal("x", 2.0, 1.0, ">=", 1.5, "/s").met is True
    assert Goal("x", 0, None, "==", 0, "calls", relative=False).met is True
    assert Goal("x", 5.0, None, "<=", 1.0, "ms").met is None
    rows = goals({"agent": {"closed": {"1": {"p50_ms": 1.0, "p99_ms": 2.0}}},
                  "floors": {"in_process": {"edge INT8": {"batch1": {"p50_ms": 0.2}}},
                             "echo": {"kserve": {"1": {"p50_ms": 0.6}}}}})
    assert rows[0].value == 1.25 and rows[0].met is True
    assert all(g.met is None for g in rows[1:]), "targets without their figures must be n/a"
    machine = {"cores": 2, "cpu": "x86", "memory_gib": 1.0, "gpu": "no GPU", "python": "3",
               "onnxruntime": "1", "commit": "c", "client_procs": 2, "load_average_at_start": [0, 0, 0]}
    table = format_table({"machine": machine, "quick": True, "plan": {"concurrency": [1], "streams": [1]}})
    assert table.count("n/a") == 11, table


def test_bench_needs_two_client_processes(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--client-procs", "1"])
    assert exit_info.value.code == 2 and "must be >= 2" in capsys.readouterr().err
