"""The bench's PNG plots (matplotlib, the ``bench`` extra): latency CDFs, throughput against concurrency,
and the slow-cloud comparison."""

from __future__ import annotations

from pathlib import Path

from edgecloud_tools.bench.targets import get

#: one colour per system in every plot
COLORS = {"in-process backend": "#7f7f7f", "bare gRPC echo": "#17becf", "KServe v2 echo": "#1f77b4",
          "edge model served bare": "#8c564b", "cloud model served bare": "#8c564b",
          "edge agent": "#d62728", "FastAPI + uvicorn": "#ff7f0e", "MLServer": "#9467bd",
          "gateway, batching on": "#d62728", "gateway, batching off": "#2ca02c",
          "MLServer, adaptive batching": "#9467bd"}


def _cdf(ax, points: list | None, label: str, **style) -> None:
    if points:
        style.setdefault("color", COLORS.get(label))
        ax.plot([p[1] for p in points], [p[0] for p in points], label=label, **style)


def _series(ax, closed: dict | None, label: str, **style) -> None:
    if closed:
        xs = sorted(int(k) for k in closed)
        ax.plot(xs, [closed[str(x)]["per_s"] for x in xs], marker="o", label=label, color=COLORS.get(label),
                **style)


def _axes(ax, title: str, xlabel: str, ylabel: str, log2: bool = False) -> None:
    ax.set_xscale("log", base=2 if log2 else 10)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def latency_cdf(plt, r: dict, path: Path) -> None:
    floors, agent, peers = (r.get(k) or {} for k in ("floors", "agent", "peers"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    _cdf(left, get(floors, "in_process", "edge INT8", "batch1", "cdf"), "in-process backend")
    _cdf(left, get(floors, "echo", "bare", "1", "cdf"), "bare gRPC echo")
    _cdf(left, get(floors, "echo", "kserve", "1", "cdf"), "KServe v2 echo")
    _cdf(left, get(floors, "echo", "model", "1", "cdf"), "edge model served bare")
    _cdf(left, get(agent, "closed", "1", "cdf"), "edge agent", linewidth=2.5)
    _cdf(left, get(peers, "fastapi", "closed", "1", "cdf"), "FastAPI + uvicorn")
    _cdf(left, get(peers, "mlserver", "closed", "1", "cdf"), "MLServer")
    _axes(left, "batch 1, one client: latency CDF", "ms", "% of calls")
    _cdf(right, get(agent, "closed", "1", "cdf"), "closed loop, 1 client")
    for factor, o in (agent.get("open") or {}).items():
        _cdf(right, o.get("cdf"), f"open loop {factor}x capacity (answered)")
    _axes(right, "edge agent under an open loop", "ms", "% of calls")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def throughput(plt, r: dict, path: Path) -> None:
    floors, agent, peers, gateway = (r.get(k) or {} for k in ("floors", "agent", "peers", "gateway"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    _series(left, get(floors, "echo", "bare"), "bare gRPC echo", linestyle="--")
    _series(left, get(floors, "echo", "kserve"), "KServe v2 echo", linestyle="--")
    _series(left, get(floors, "echo", "model"), "edge model served bare", linestyle="--")
    _series(left, agent.get("closed"), "edge agent", linewidth=2.5)
    _series(left, get(peers, "fastapi", "closed"), "FastAPI + uvicorn")
    _series(left, get(peers, "mlserver", "closed"), "MLServer")
    _axes(left, "edge model, batch 1: calls/s vs clients", "concurrent clients", "calls/s", log2=True)
    _series(right, get(gateway, "batching", "closed"), "gateway, batching on", linewidth=2.5)
    _series(right, get(gateway, "no_batching", "closed"), "gateway, batching off")
    _series(right, get(gateway, "mlserver_adaptive", "closed"), "MLServer, adaptive batching")
    _series(right, get(floors, "echo", "kserve"), "KServe v2 echo", linestyle="--")
    _series(right, get(floors, "echo", "cloud_model"), "cloud model served bare", linestyle="--")
    _axes(right, "cloud model, single-row streams: calls/s", "concurrent streams", "calls/s", log2=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def slow_cloud(plt, r: dict, path: Path) -> None:
    slow = r.get("slow_cloud") or {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _cdf(ax, get(slow, "edge_only_alone", "cdf"), "edge-only client alone")
    _cdf(ax, get(slow, "edge_only_beside_escalations", "cdf"),
         f"beside {slow.get('escalating_clients', '')} escalating clients", linewidth=2.5)
    _cdf(ax, get(slow, "escalations", "cdf"), "the escalating clients", linestyle=":")
    _axes(ax, f"edge-only latency, cloud {slow.get('cloud_rtt_ms', 250):g} ms away", "ms", "% of calls")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fleet_rollouts(plt, r: dict, path: Path) -> None:
    """Devices serving the good release and the wrong one over time, with the wave commands."""
    f = r.get("fleet") or {}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    runs = (("good", "a good release"), ("wrong", "a confidently wrong release"))
    for ax, (key, title) in zip(axes, runs):
        timeline = get(f, key, "timeline") or {}
        points = timeline.get("serving") or []
        ax.step([p[0] for p in points], [p[1] for p in points], where="post", color="#d62728", linewidth=2)
        for seconds, wave, state in timeline.get("commands") or []:
            ax.axvline(seconds, color="#7f7f7f" if state != "halted" else "#000000", linestyle=":")
            ax.annotate(f"{state} {wave}", (seconds, 0), rotation=90, fontsize=7, va="bottom")
        ax.set_title(f"{f.get('devices', '')} devices: {title}")
        ax.set_xlabel("seconds after publishing")
        ax.set_ylabel("devices serving it")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: file name → what draws it, and the stages whose figures it shows (drawn when one of them ran)
PLOTS = {"latency_cdf.png": (latency_cdf, ("floors", "agent", "peers")),
         "throughput.png": (throughput, ("floors", "agent", "peers", "gateway")),
         "slow_cloud.png": (slow_cloud, ("slow_cloud",)), "fleet_rollouts.png": (fleet_rollouts, ("fleet",))}


def plot(r: dict, out: Path) -> list[Path] | None:
    """Write the plots into ``out``; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    drawn = []
    for name, (draw, stages) in PLOTS.items():
        if any(stage in r for stage in stages):
            draw(plt, r, out / name)
            drawn.append(out / name)
    return drawn
