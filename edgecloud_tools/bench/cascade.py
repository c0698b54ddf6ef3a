"""Cascade vs cloud-only vs edge-only behind an emulated 30 ms WAN, on the demo's held-out images sent one
at a time: accuracy, mean and p99 latency, and the bytes each mode sent upstream (counted on the wire
by the delay proxy between the device side and the gateway). The agent's link to the cloud is opened
before the timed runs.
"""

from __future__ import annotations

import numpy as np

from edgecloud.protocol.parameters import AgentRequest, AgentResponse
from edgecloud_tools.bench.plan import WAN_MS, Bench, progress
from edgecloud_tools.rig import servers
from edgecloud_tools.rig.delay_proxy import DelayProxy
from edgecloud_tools.toolchain import CLOUD_NAME
from edgecloud_tools.toolchain.dataset import make_split

LOGITS = "logits"


def cascade(bench: Bench) -> dict:
    n = bench.plan.cascade_images
    labels = make_split("test", n)[1]
    escalated = str(AgentResponse.ESCALATED)
    gateway = servers.gateway(bench.workdir, bench.models.repository, "gw-wan", store=True)
    out: dict = {"wan_ms": WAN_MS, "images": n, "modes": {}}
    with gateway, DelayProxy(gateway.port, WAN_MS) as proxy:
        agent = servers.agent(bench.workdir, bench.models.edge, "agent-wan", cloud=proxy.port)
        with agent:
            modes = {
                "edge only": bench.target("triton", agent.port, bench.models.edge_name, output=LOGITS,
                                          params={str(AgentRequest.ESCALATE): "never"}),
                "cloud only": bench.target("triton", proxy.port, CLOUD_NAME, output=LOGITS),
                "cascade": bench.target("triton", agent.port, bench.models.edge_name, output=LOGITS,
                                        flags=(escalated,)),
            }
            # the agent's first escalation opens its channel and checks the cloud model's metadata: once
            always = bench.target("triton", agent.port, bench.models.edge_name,
                                  params={str(AgentRequest.ESCALATE): "always"})
            bench.pool.closed(always, 1, duration_s=0.3, warmup_s=0.0)
            for mode, target in modes.items():
                progress(f"{mode}, {n} images one at a time, {WAN_MS:g} ms WAN")
                sent = proxy.upstream_bytes
                result = bench.pool.sequence(target, n)
                upstream = proxy.upstream_bytes - sent
                top1 = np.array([-1 if t is None else t for t in result.top1])
                asked = [True] * n if mode == "cloud only" else [escalated in f for f in result.flag_rows]
                out["modes"][mode] = {**result.summary(), "upstream_bytes": upstream,
                                      "accuracy": round(float(np.mean(top1 == labels)), 4),
                                      "to_cloud": round(float(np.mean(asked)), 4)}
    return out
