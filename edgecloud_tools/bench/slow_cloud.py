"""A slow but alive cloud beside edge-only traffic: the gateway behind a delay proxy adding a 250 ms
round trip (inside the agent's 300 ms deadline), 16 clients whose every row escalates
(``escalate=always``), and one local app calling with ``escalate=never``.

The edge-only client's p50 and p99 are measured on the same agent without and then with the escalating
load: the edge must not wait for the cloud, so the two should be close. The agent's escalation bound
(``cloud.max_in_flight``) is raised to the number of escalating clients, with room in admission for
the edge-only caller, so every escalation really waits on the cloud: at the default bound of 8 the
other 8 clients are answered by the edge at once (``degraded``) and become a closed loop of plain edge
calls, which measures sharing 2 cores, not waiting.
"""

from __future__ import annotations

from edgecloud.protocol.parameters import AgentRequest, AgentResponse
from edgecloud_tools.bench.plan import ESCALATING_CLIENTS, SLOW_CLOUD_MS, Bench, progress
from edgecloud_tools.rig import servers
from edgecloud_tools.rig.delay_proxy import DelayProxy

#: every escalating client's call waits on the cloud, and edge-only calls still find a slot
SIZED_FOR_ESCALATIONS = (f"[cloud]\nmax_in_flight = {ESCALATING_CLIENTS}\n"
                         f"[admission]\nmax_in_flight = {2 * ESCALATING_CLIENTS}\n")


def slow_cloud(bench: Bench) -> dict:
    plan, pool = bench.plan, bench.pool
    gateway = servers.gateway(bench.workdir, bench.models.repository, "gw-slow", store=True)
    with gateway, DelayProxy(gateway.port, SLOW_CLOUD_MS) as proxy:
        config = bench.workdir / "agent-slow-cloud.toml"
        config.write_text(SIZED_FOR_ESCALATIONS)
        agent = servers.agent(bench.workdir, bench.models.edge, "agent-slow-cloud", cloud=proxy.port,
                              config=config)
        with agent:
            edge = bench.target("triton", agent.port, bench.models.edge_name,
                                params={str(AgentRequest.ESCALATE): "never"})
            escalating = bench.target("triton", agent.port, bench.models.edge_name,
                                      params={str(AgentRequest.ESCALATE): "always"},
                                      flags=(str(AgentResponse.ESCALATED), str(AgentResponse.DEGRADED)))
            progress("slow cloud: edge-only client alone")
            alone = pool.closed(edge, 1, plan.slow_cloud_s, plan.warmup_s, procs=[0])
            progress(f"slow cloud: edge-only client beside {ESCALATING_CLIENTS} escalating clients "
                     f"({SLOW_CLOUD_MS:g} ms cloud)")
            # the escalating load starts first and outlasts the edge-only client's warm-up and timed part
            outlast_s = plan.slow_cloud_s + 2 * plan.warmup_s + 1.0
            load = pool.start_closed(escalating, ESCALATING_CLIENTS, outlast_s, plan.warmup_s, procs=[1])
            beside = pool.closed(edge, 1, plan.slow_cloud_s, plan.warmup_s, procs=[0])
            escalations = load.result()
    summary = escalations.summary()
    return {"cloud_rtt_ms": SLOW_CLOUD_MS, "escalating_clients": ESCALATING_CLIENTS,
            "edge_only_alone": alone.summary(), "edge_only_beside_escalations": beside.summary(),
            "escalations": {**summary, "degraded": escalations.flags.get(str(AgentResponse.DEGRADED), 0)}}
