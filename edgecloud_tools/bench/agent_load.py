"""The edge agent under load from client processes (tritonclient, ``escalate=never``, batch 1): closed
loops at each concurrency, then open loops at multiples of the capacity the closed loops measured.

The open loop is what shows admission control: a closed loop slows itself down and hides the queue, a
fixed arrival rate above capacity must be met by answering some calls at once with RESOURCE_EXHAUSTED
rather than letting every call wait. The agent's memory is sampled while it runs.
"""

from __future__ import annotations

from edgecloud.protocol.parameters import AgentRequest
from edgecloud_tools.bench.plan import CPU_STREAMS, OPEN_LOOP_FACTORS, Bench, progress
from edgecloud_tools.rig import servers

#: a call of the open loop that gets no answer within this is counted as an error, not waited for
OPEN_LOOP_TIMEOUT_S = 10.0
SHED = "RESOURCE_EXHAUSTED"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def agent_load(bench: Bench) -> dict:
    plan = bench.plan
    service = servers.agent(bench.workdir, bench.models.edge, "agent")
    with service:
        target = bench.target("triton", service.port, bench.models.edge_name,
                              params={str(AgentRequest.ESCALATE): "never"})
        out: dict = {"startup_s": round(service.startup_s or 0.0, 3), "closed": {}, "open": {}}
        for n in plan.concurrency:
            progress(f"edge agent, closed loop, {n} concurrent")
            out["closed"][str(n)] = bench.closed(target, n).summary()
        progress(f"edge agent, CPU per call at {CPU_STREAMS} clients")
        out["cpu_us_per_call"] = bench.cpu_per_call(target, service.proc.pid)
        capacity = max(p["per_s"] for p in out["closed"].values())
        target = bench.target("bare", service.port, bench.models.edge_name, method=MODEL_INFER,
                              params={str(AgentRequest.ESCALATE): "never"})
        out["capacity_per_s"] = capacity
        for factor in OPEN_LOOP_FACTORS:
            rate = factor * capacity
            progress(f"edge agent, open loop at {factor:g}x capacity ({rate:.0f} calls/s for "
                     f"{plan.open_duration_s:g} s)")
            with servers.RssSampler(service.proc.pid) as rss:
                result = bench.pool.open(target, rate, plan.open_duration_s, OPEN_LOOP_TIMEOUT_S)
            summary = result.summary()
            out["open"][f"{factor:g}"] = {
                **summary, "factor": factor, "rate_per_s": round(rate, 1),
                "offered_per_s": round(result.issued / (result.issued_s or plan.open_duration_s), 1),
                "issued": result.issued, "answered": result.ok, "shed": result.errors.get(SHED, 0),
                "other_errors": sum(n for code, n in result.errors.items() if code != SHED),
                "rss_before_bytes": rss.before, "rss_peak_bytes": rss.peak}
    return out
