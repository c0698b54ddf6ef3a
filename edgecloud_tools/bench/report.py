"""The bench's table: every figure beside its baseline or peer from the same run, with the ratio, and the
targets as rows that are met or not. A stage that did not run, or a peer that is not installed, shows
its reason instead of figures."""

from __future__ import annotations

from edgecloud_tools.bench.plan import CPU_STREAMS
from edgecloud_tools.bench.targets import Goal, get, goals
from edgecloud_tools.output import columns, fmt_mb, fmt_ms


def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _x(value: float | None, baseline: float | None) -> str:
    return "-" if value is None or not baseline else f"{value / baseline:.2f}x"


def _failed(r: dict, *stages: str) -> list[str]:
    return [f"  {stage} not run: {r[stage]['error']}" for stage in stages
            if isinstance(r.get(stage), dict) and "error" in r[stage]]


def machine_line(r: dict) -> str:
    m = r["machine"]
    load = ", ".join(f"{x:g}" for x in m["load_average_at_start"])
    run = "quick" if r["quick"] else "full"
    return (f"{m['cores']} cores ({m['cpu']}), {m['memory_gib']:.1f} GiB RAM, {m['gpu']}, "
            f"Python {m['python']}, onnxruntime {m['onnxruntime']}, commit {m['commit']}; {run} run, "
            f"{m['client_procs']} client processes, load average at start {load}")


def models_section(r: dict) -> list[str]:
    ip = get(r, "floors", "in_process") or {}
    if not ip:
        return _failed(r, "floors")
    batch = next(iter(ip.values()))["batch"]
    head = ["in process (ONNX Runtime, CPU)", "size KB", "p50 ms", "p99 ms", f"rows/s @{batch}"]
    return columns(head, [[k, f"{v['size_bytes'] / 1e3:.0f}", fmt_ms(v["batch1"]["p50_ms"]),
                           fmt_ms(v["batch1"]["p99_ms"]), _n(v["rows_per_s"])] for k, v in ip.items()])


def _peer(r: dict, section: str, key: str) -> tuple[str, dict | None, str | None]:
    """A peer's title, its closed-loop points and, when it did not run, why."""
    peer = get(r, section, key) or {}
    return peer.get("title", key), peer.get("closed"), None if peer.get("closed") else peer.get("status")


def _absent(title: str, status: str | None, width: int, notes: list[str]) -> list[str]:
    """The row of a system that did not run (a peer not installed), its reason added to ``notes``."""
    if status:
        notes.append(f"  {title}: {status}")
    return [title, status.split(" (")[0] if status else "not run", *["-"] * (width - 2)]


def batch1_section(r: dict) -> list[str]:
    """Latency at 1 client and calls/s at each concurrency: the floors, the agent, the peers."""
    counts = r["plan"]["concurrency"]
    agent = get(r, "agent", "closed") or {}
    systems = [("bare gRPC echo", get(r, "floors", "echo", "bare"), None),
               ("KServe v2 echo (our stubs)", get(r, "floors", "echo", "kserve"), None),
               ("edge model served bare (KServe v2)", get(r, "floors", "echo", "model"), None),
               ("edge agent", agent, None), _peer(r, "peers", "fastapi"), _peer(r, "peers", "mlserver")]
    head = ["batch 1, closed loop", "p50 ms @1", "p99 ms @1", *[f"calls/s @{n}" for n in counts],
            "agent/this @16"]
    rows, notes = [], []
    ip = get(r, "floors", "in_process", "edge INT8", "batch1")
    if ip:
        rows.append(["in-process backend (edge INT8)", fmt_ms(ip["p50_ms"]), fmt_ms(ip["p99_ms"]),
                     *["-"] * (len(counts) + 1)])
    for title, closed, status in systems:
        if not closed:
            rows.append(_absent(title, status, len(head), notes))
            continue
        rows.append([title, fmt_ms(get(closed, "1", "p50_ms")), fmt_ms(get(closed, "1", "p99_ms")),
                     *[_n(get(closed, str(n), "per_s")) for n in counts],
                     "" if closed is agent else _x(get(agent, "16", "per_s"), get(closed, "16", "per_s"))])
    lines = columns(head, rows) + notes
    echo1 = get(r, "floors", "echo", "kserve", "1", "p50_ms")
    if ip and echo1 is not None and get(agent, "1", "p50_ms") is not None:
        floor = ip["p50_ms"] + echo1
        lines.append(f"  agent p50 at 1 client {fmt_ms(agent['1']['p50_ms'])} ms vs in-process "
                     f"{fmt_ms(ip['p50_ms'])} + KServe v2 echo {fmt_ms(echo1)} = {fmt_ms(floor)} ms: "
                     f"{_x(agent['1']['p50_ms'], floor)}")
    cpu = [(title, value) for title, value in (
        ("KServe v2 echo", get(r, "floors", "echo", "cpu_us_per_call", "kserve")),
        ("edge model served bare", get(r, "floors", "echo", "cpu_us_per_call", "model")),
        ("edge agent", get(r, "agent", "cpu_us_per_call"))) if value is not None]
    if cpu:
        lines.append(f"  server CPU per call at {CPU_STREAMS} clients: "
                     + ", ".join(f"{title} {_n(value)} us" for title, value in cpu))
    return lines + _failed(r, "floors", "agent", "peers")


def open_loop_section(r: dict) -> list[str]:
    agent = r.get("agent") or {}
    if not agent.get("open"):
        return []
    unloaded = get(agent, "closed", "1", "p99_ms")
    head = ["open loop on the agent", "rate/s", "sent/s", "answered", "shed", "other errors", "p50 ms",
            "p99 ms", "p99/unloaded", "RSS MB before/peak"]
    rows = [[f"{o['factor']:g}x capacity", _n(o["rate_per_s"]), _n(o["offered_per_s"]), str(o["answered"]),
             str(o["shed"]), str(o["other_errors"]), fmt_ms(o["p50_ms"]), fmt_ms(o["p99_ms"]),
             _x(o["p99_ms"], unloaded), f"{fmt_mb(o['rss_before_bytes'])}/{fmt_mb(o['rss_peak_bytes'])}"]
            for o in agent["open"].values()]
    return [f"  capacity (best closed loop): {_n(agent['capacity_per_s'])} calls/s; unloaded p99 "
            f"{fmt_ms(unloaded)} ms; shed = RESOURCE_EXHAUSTED", *columns(head, rows)]


def gateway_section(r: dict) -> list[str]:
    streams = r["plan"]["streams"]
    on = get(r, "gateway", "batching", "closed") or {}
    systems = [("gateway, dynamic batching on", on, None),
               ("gateway, dynamic batching off", get(r, "gateway", "no_batching", "closed"), None),
               _peer(r, "gateway", "mlserver_adaptive"),
               ("KServe v2 echo (floor)", get(r, "floors", "echo", "kserve"), None),
               ("cloud model served bare, unbatched", get(r, "floors", "echo", "cloud_model"), None)]
    head = ["cloud model, single-row streams", *[f"calls/s @{n}" for n in streams], "p99 ms @64",
            "on/this @64"]
    rows, notes = [], []
    for title, closed, status in systems:
        if not closed:
            rows.append(_absent(title, status, len(head), notes))
            continue
        ratio = "" if closed is on else _x(get(on, "64", "per_s"), get(closed, "64", "per_s"))
        rows.append([title, *[_n(get(closed, str(n), "per_s")) for n in streams],
                     fmt_ms(get(closed, "64", "p99_ms")), ratio])
    lines = columns(head, rows) + notes
    cloud = get(r, "floors", "in_process", "cloud FP32")
    if cloud:
        lines.append(f"  cloud model in process at batch {cloud['batch']}: {_n(cloud['rows_per_s'])} rows/s")
    return lines + _failed(r, "gateway")


def slow_cloud_section(r: dict) -> list[str]:
    s = r.get("slow_cloud") or {}
    if "edge_only_alone" not in s:
        return _failed(r, "slow_cloud")
    a, b, e = s["edge_only_alone"], s["edge_only_beside_escalations"], s["escalations"]
    head = [f"edge-only client, cloud {s['cloud_rtt_ms']:g} ms away", "p50 ms", "p99 ms", "calls/s"]
    lines = columns(head, [
        ["alone", fmt_ms(a["p50_ms"]), fmt_ms(a["p99_ms"]), _n(a["per_s"])],
        [f"beside {s['escalating_clients']} escalating clients", fmt_ms(b["p50_ms"]), fmt_ms(b["p99_ms"]),
         _n(b["per_s"])],
        ["beside / alone", _x(b["p50_ms"], a["p50_ms"]), _x(b["p99_ms"], a["p99_ms"]), ""]])
    errors = ", ".join(f"{k} {v}" for k, v in e["errors"].items()) or "none"
    lines.append(f"  the escalating clients: {e['ok']} answered ({_n(e['per_s'])}/s), p50 "
                 f"{fmt_ms(e['p50_ms'])} ms, {e['degraded']} degraded, errors: {errors}")
    return lines


def cascade_section(r: dict) -> list[str]:
    c = r.get("cascade") or {}
    if not c.get("modes"):
        return _failed(r, "cascade")
    cloud = get(c, "modes", "cloud only", "mean_ms")
    head = [f"{c['images']} images, {c['wan_ms']:g} ms WAN", "accuracy", "to cloud", "mean ms", "p99 ms",
            "mean/cloud-only", "bytes upstream"]
    return columns(head, [[mode, f"{m['accuracy']:.2%}", f"{m['to_cloud']:.1%}", fmt_ms(m["mean_ms"]),
                           fmt_ms(m["p99_ms"]), _x(m["mean_ms"], cloud), f"{m['upstream_bytes']:,}"]
                          for mode, m in c["modes"].items()])


def frames_section(r: dict) -> list[str]:
    f = r.get("frames") or {}
    if "upstream" not in f:
        return _failed(r, "frames")
    p, a, up = f["in_process"], f["agent"], f["upstream"]
    h, w = p["frame"]["size"]
    lines = columns([f"{w}x{h} JPEG frames (~{p['frame']['mean_bytes']:,} bytes)", "p50 ms", "p99 ms"], [
        ["decode + pre-process, in process", fmt_ms(p["decode_preprocess"]["p50_ms"]),
         fmt_ms(p["decode_preprocess"]["p99_ms"])],
        ["the edge model on the row it gives", fmt_ms(p["model"]["p50_ms"]), fmt_ms(p["model"]["p99_ms"])],
        [f"through the agent, {a['clients']} clients ({_n(a['per_s'])} frames/s)", fmt_ms(a["p50_ms"]),
         fmt_ms(a["p99_ms"])]])
    lines.append(f"  upstream bytes per escalated row: original frame {up['frame']['bytes_per_row']:,}, "
                 f"tensor {up['tensor']['bytes_per_row']:,}")
    return lines


def start_section(r: dict) -> list[str]:
    c = r.get("cold_start") or {}
    rows = []
    if "ready_s" in c:
        rows.append([f"edge agent, to READY=1 (median of {len(c['starts'])})", f"{c['ready_s']:.2f}",
                     fmt_mb(c["rss_bytes"])])
    for title, data in [("KServe v2 echo, to SERVING", get(r, "floors", "echo")),
                        ("FastAPI + uvicorn, to /health", get(r, "peers", "fastapi")),
                        ("MLServer, to model ready", get(r, "peers", "mlserver"))]:
        if data and data.get("startup_s") is not None:
            rows.append([title, f"{data['startup_s']:.2f}", fmt_mb(data.get("rss_bytes"))])
    head = ["start-up (RSS: the agent's at READY, the others' after their load)", "seconds", "RSS MB"]
    return columns(head, rows) + _failed(r, "cold_start")


def _figure(g: Goal, v: float | None) -> str:
    if v is None:
        return "-"
    return {"ms": f"{fmt_ms(v)} ms", "/s": f"{_n(v)}/s", "bytes": f"{fmt_mb(v)} MB"}.get(g.unit, f"{v:g}")


def targets_section(r: dict) -> list[str]:
    rows = []
    for g in goals(r):
        value = "-" if g.value is None else (f"{g.value:.2f}x" if g.relative else f"{g.value:g}")
        limit = f"{g.op} {g.limit:g}{'x' if g.relative else ''}"
        rows.append([g.name, _figure(g, g.figure), _figure(g, g.baseline), value, limit,
                     {True: "met", False: "NOT MET", None: "n/a"}[g.met]])
    return columns(["target (issue 9)", "figure", "baseline", "ratio", "target", ""], rows)


def format_table(r: dict) -> str:
    sections = [("", [f"  {machine_line(r)}"]), ("models", models_section(r)),
                ("agent, floors and peers", batch1_section(r)), ("admission", open_loop_section(r)),
                ("gateway", gateway_section(r)), ("slow cloud", slow_cloud_section(r)),
                ("cascade", cascade_section(r)), ("frames", frames_section(r)),
                ("start-up", start_section(r)),
                ("targets", targets_section(r))]
    out = []
    for title, lines in sections:
        if lines:
            out += ([f"{title}:"] if title else []) + lines + [""]
    return "\n".join(out).rstrip() + "\n"
