"""Faults of the serving path: the gateway killed under load, a slow cloud, the agent killed with a
full spool, a full disk, the cloud's return, and twice the load the agent can take.

Every agent escalates every row (``escalate=always``) unless said otherwise, so each answered call is
a case the store must end up holding exactly once, whether the cloud answered it at once or the spool
replayed it later.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from edgecloud.endpoint import free_loopback_port
from edgecloud_tools.bench.agent_load import SHED
from edgecloud_tools.faults.harness import Load, agent_count, escalate, stored_once
from edgecloud_tools.faults.plan import Faults, Outcome, progress
from edgecloud_tools.rig import servers
from edgecloud_tools.rig.clients import Target
from edgecloud_tools.rig.delay_proxy import DelayProxy
from edgecloud_tools.rig.services import ServiceProcess, wait_until, write_toml

#: the agent's escalation deadline (its default), which every answer promise is built on
DEADLINE_MS = 300
#: how long the spool may take to bring every case to the store once the cloud is back: a start-up
#: allowance (the circuit's reset_s, a replay interval) and a floor on the rate it replays at
REPLAY_TIMEOUT_S = 30.0
REPLAYED_PER_S = 50.0
#: the slow cloud's added round trip: over the deadline, so every escalation times out
SLOW_RTT_MS = 1000.0
#: the disk-full fault's state directory size
DISK_BYTES = 1 << 20
MOUNT = f"mount -t tmpfs -o size={DISK_BYTES} tmpfs"
SPOOL = {"replay_interval_s": 0.2}


def _agent(f: Faults, d: Path, device: str, cloud: int | None, **sections) -> tuple[ServiceProcess, int]:
    """An agent on the edge model escalating to ``cloud``, and its metrics port."""
    metrics = free_loopback_port()
    config = write_toml(d / f"{device}.toml", {"spool": SPOOL, **sections})
    service = servers.agent(d, f.models.edge, device, cloud=cloud, config=config, device_id=device,
                            metrics_port=metrics)
    return service, metrics


def _stored(outcome: Outcome, store: Path, device: str, ids: set[str], lost: int) -> bool:
    """Waits for the store to hold every one of ``ids`` but the ``lost`` ones (the spool's count of
    cases its writer could not keep: docs/design.md §4); records stored/expected; True when each is
    there exactly once or counted as dropped, and none twice."""
    wait_until(lambda: stored_once(store, device, ids)[0] >= len(ids) - lost,
               REPLAY_TIMEOUT_S + len(ids) / REPLAYED_PER_S, 0.2)
    once, missing, twice = stored_once(store, device, ids)
    outcome.stored, outcome.expected = once, len(ids)
    outcome.figures.update(missing=missing, spool_dropped=lost, stored_twice=twice)
    return outcome.check("every answered case stored exactly once, or counted as dropped",
                         missing <= lost and not twice,
                         f"{once}/{len(ids)} once; missing {missing}, counted dropped {lost}, twice {twice}")


def _written(metrics: int) -> int:
    """Cases the agent's spool holds or counted as dropped."""
    return agent_count(metrics, "spool_depth") + agent_count(metrics, "spool_dropped_total")


def _answers(outcome: Outcome, load: Load, deadline_ms: float) -> None:
    load.record(outcome, deadline_ms)
    outcome.check("no call failed", outcome.failed == 0, f"{outcome.failed} failed {load.errors() or ''}")
    outcome.check("answered p99 within the deadline", (outcome.p99_ms or 0.0) <= deadline_ms,
                  f"p99 {outcome.p99_ms} ms vs {deadline_ms:g} ms", measured=True)


def gateway_kill(f: Faults) -> Outcome:
    out = Outcome("gateway_kill", "the gateway SIGKILLed and restarted under load: every call answered "
                  "in time (degraded while it is away), every case stored exactly once or counted as dropped")
    d, plan = f.dir("gateway-kill"), f.plan
    gateway = servers.gateway(d, f.models.repository, "gw", store=True)
    store = d / "gw-hard-examples.db"
    with gateway:
        agent, metrics = _agent(f, d, "gw-kill-1", gateway.port)
        with agent, servers.RssSampler(agent.proc.pid) as rss:
            load = Load(agent.port, f.models.edge_name, f.input["name"], f.images(64), "gk",
                        plan.streams, params=escalate("always"), pause_s=plan.pause_s).start()
            load.wait_done(plan.calls // 3)
            killed_at = load.done
            progress(f"gateway kill: SIGKILL after {killed_at} calls, back in {plan.outage_s:g} s")
            gateway.proc.kill()
            gateway.proc.wait()
            time.sleep(plan.outage_s)
            gateway.start()
            back = load.done
            load.wait_done(back + plan.calls // 3)
            load.stop()
            _stored(out, store, "gw-kill-1", load.answered_ids(),
                    agent_count(metrics, "spool_dropped_total"))
        out.rss_before_bytes, out.rss_peak_bytes = rss.before, rss.peak
        _answers(out, load, f.promises.answer_ms)
        out.figures["calls_while_away"] = back - killed_at
    return out


def slow_cloud(f: Faults) -> Outcome:
    out = Outcome("slow_cloud", f"a cloud {SLOW_RTT_MS:g} ms away (over the {DEADLINE_MS} ms deadline): "
                  "every call answered by the edge in time, degraded, and stored once (or counted as "
                  "dropped) when the cloud is fast again")
    d, plan = f.dir("slow-cloud"), f.plan
    gateway = servers.gateway(d, f.models.repository, "gw", store=True)
    with gateway, DelayProxy(gateway.port, SLOW_RTT_MS) as proxy:
        agent, metrics = _agent(f, d, "slow-cloud-1", proxy.port)
        with agent, servers.RssSampler(agent.proc.pid) as rss:
            load = Load(agent.port, f.models.edge_name, f.input["name"], f.images(64), "sc", plan.streams,
                        max_calls=plan.calls, params=escalate("always")).start().join()
            proxy.one_way_s = 0.0  # the cloud is fast again: the spool replays
            out.rss_before_bytes, out.rss_peak_bytes = rss.before, rss.peak
            _answers(out, load, f.promises.answer_ms)
            out.check("every call degraded (the cloud never answered in time)",
                      out.degraded == out.answered, f"{out.degraded}/{out.answered}")
            _stored(out, d / "gw-hard-examples.db", "slow-cloud-1", load.answered_ids(),
                    agent_count(metrics, "spool_dropped_total"))
    return out


def agent_kill(f: Faults) -> Outcome:
    out = Outcome("agent_kill", "the agent kill -9ed with a full spool, and again mid-replay: every case "
                  "it had written or counted as dropped replayed and stored exactly once")
    d, plan = f.dir("agent-kill"), f.plan
    gateway = servers.gateway(d, f.models.repository, "gw", store=True)  # started after the first kill
    store, device = d / "gw-hard-examples.db", "agent-kill-1"
    agent, metrics = _agent(f, d, device, gateway.port)
    with agent:
        load = Load(agent.port, f.models.edge_name, f.input["name"], f.images(64), "ak", plan.streams,
                    max_calls=plan.spool_cases, params=escalate("always")).start().join()
        ids = load.answered_ids()
        wait_until(lambda: _written(metrics) >= len(ids), 10.0)
        depth, dropped = agent_count(metrics, "spool_depth"), agent_count(metrics, "spool_dropped_total")
        agent.proc.kill()
        agent.proc.wait()
    progress(f"agent kill: {depth} cases spooled, kill -9; the cloud is back, the agent restarts")
    load.record(out, f.promises.answer_ms)
    out.check("no call failed", out.failed == 0, f"{out.failed} failed")
    out.check("every degraded call spooled or counted as dropped before the kill",
              depth + dropped == len(ids), f"{depth} spooled + {dropped} dropped of {len(ids)}")
    kills = 1
    with gateway:
        with agent:  # the same state directory, ports and device
            replaying = wait_until(lambda: stored_once(store, device, ids)[0] > 0, 20.0, 0.01)
            if replaying and stored_once(store, device, ids)[0] < len(ids):
                agent.proc.kill()  # mid-replay
                agent.proc.wait()
                kills += 1
        with agent, servers.RssSampler(agent.proc.pid) as rss:
            _stored(out, store, device, ids, dropped)
        out.rss_before_bytes, out.rss_peak_bytes = rss.before, rss.peak
    out.figures.update(spooled_before_kill=depth, kills=kills)
    return out


def _tmpfs_probe(directory: Path) -> bool:
    """True when a tmpfs can be mounted in a private mount namespace (the mount ends with it)."""
    try:
        done = subprocess.run(["unshare", "-rm", "sh", "-c", f'{MOUNT} "$0"', str(directory)],
                              check=False, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def disk_full(f: Faults) -> Outcome:
    out = Outcome("disk_full", f"a state directory of {DISK_BYTES >> 20} MiB filled by the spool while the "
                  "cloud is away: every call answered in time, each case spooled or counted as dropped")
    d, plan = f.dir("disk-full"), f.plan
    state, device = d / "disk-full-1", "disk-full-1"
    state.mkdir(exist_ok=True)
    mounted = _tmpfs_probe(state)
    spool = dict(SPOOL) if mounted else {**SPOOL, "max_bytes": DISK_BYTES}
    metrics = free_loopback_port()
    config = write_toml(d / f"{device}.toml", {"spool": spool})
    agent = servers.agent(d, f.models.edge, device, cloud=free_loopback_port(), config=config,
                          device_id=device, metrics_port=metrics)
    if mounted:  # the agent runs in its own mount namespace, on a tmpfs as its state directory
        agent.command = ["unshare", "-rm", "sh", "-c",
                         f'{MOUNT} "$0" && exec "$@"', str(state),
                         *agent.command]
    out.figures["disk"] = (f"tmpfs of {DISK_BYTES >> 20} MiB" if mounted else
                           f"emulated: spool.max_bytes = {DISK_BYTES >> 20} MiB (no tmpfs: mounting is not "
                           "allowed)")
    progress(f"disk full: {out.figures['disk']}")
    with agent, servers.RssSampler(agent.proc.pid) as rss:
        load = Load(agent.port, f.models.edge_name, f.input["name"], f.images(64), "df", plan.streams,
                    max_calls=plan.disk_calls, params=escalate("always")).start().join()
        degraded = sum(c.degraded for c in load.calls)
        wait_until(lambda: _written(metrics) >= degraded, 10.0)
        depth, dropped = agent_count(metrics, "spool_depth"), agent_count(metrics, "spool_dropped_total")
    out.rss_before_bytes, out.rss_peak_bytes = rss.before, rss.peak
    _answers(out, load, f.promises.answer_ms)
    out.figures.update(spooled=depth, dropped=dropped)
    out.check("the disk filled (cases dropped and counted)", dropped > 0, f"{dropped} dropped")
    out.check("every degraded case spooled or counted as dropped", depth + dropped == degraded,
              f"{depth} spooled + {dropped} dropped of {degraded}")
    return out


def reconnect(f: Faults) -> Outcome:
    out = Outcome("reconnect", f"the cloud away for {f.plan.outage_s:g} s, then back: the first cloud "
                  f"answer within {f.promises.reconnect_s:g} s of its return")
    d, plan = f.dir("reconnect"), f.plan
    gateway = servers.gateway(d, f.models.repository, "gw", store=True)
    with gateway:
        agent, _ = _agent(f, d, "reconnect-1", gateway.port)
        with agent, servers.RssSampler(agent.proc.pid) as rss:
            load = Load(agent.port, f.models.edge_name, f.input["name"], f.images(64), "rc", 1,
                        params=escalate("always"), pause_s=0.02).start()
            load.wait_done(10)
            gateway.proc.kill()
            gateway.proc.wait()
            time.sleep(plan.outage_s)
            gateway.start()
            back = time.monotonic()
            wait_until(lambda: any(c.source == "cloud" and c.sent_at >= back for c in list(load.calls)),
                       30.0, 0.02)
            load.stop()
    first = min((c.sent_at + c.ms / 1000.0 for c in load.calls
                 if c.source == "cloud" and c.sent_at >= back and c.ms is not None), default=None)
    after_s = None if first is None else round(first - back, 3)
    out.rss_before_bytes, out.rss_peak_bytes = rss.before, rss.peak
    load.record(out, f.promises.answer_ms)
    out.figures["first_cloud_answer_after_s"] = after_s
    out.check("first cloud answer after the return in time",
              after_s is not None and after_s <= f.promises.reconnect_s,
              f"{after_s} s vs {f.promises.reconnect_s:g} s", measured=True)
    out.check("no call failed", out.failed == 0, f"{out.failed} failed")
    return out


def overload(f: Faults) -> Outcome:
    out = Outcome("overload", "twice the calls the agent can answer: the excess refused at once with "
                  f"{SHED}, the answered ones in time, no other error")
    d, plan = f.dir("overload"), f.plan
    metrics = free_loopback_port()
    agent = servers.agent(d, f.models.edge, "overload-1", device_id="overload-1", metrics_port=metrics)
    with agent:
        target = Target("triton", f"127.0.0.1:{agent.port}", f.models.edge_name, f.input,
                        params=escalate("never"))
        capacity = f.pool.closed(target, 16, plan.overload_s / 2, 0.3).per_s
        rate = 2 * capacity
        progress(f"overload: capacity {capacity:.0f} calls/s, open loop at {rate:.0f} calls/s")
        with servers.RssSampler(agent.proc.pid) as rss:
            result = f.pool.open(target, rate, plan.overload_s, 10.0)
        # what the agent's admission refused: none of the excess, when the calls wait before it
        out.figures["admission_shed_total"] = agent_count(metrics, "admission_shed_total")
    out.rss_before_bytes, out.rss_peak_bytes = rss.before, rss.peak
    shed = result.errors.get(SHED, 0)
    other = {code: n for code, n in result.errors.items() if code != SHED}
    summary = result.summary()
    out.answered, out.failed, out.degraded = result.ok, shed + sum(other.values()), 0
    out.p99_ms, out.deadline_ms = summary["p99_ms"], f.promises.answer_ms
    offered = result.issued / (result.issued_s or plan.overload_s)
    out.figures.update(capacity_per_s=round(capacity, 1), rate_per_s=round(rate, 1),
                       offered_per_s=round(offered, 1), issued=result.issued,
                       shed=shed, shed_share=round(shed / result.issued, 3) if result.issued else None,
                       other_errors=other)
    out.check("every call answered or refused with RESOURCE_EXHAUSTED", not other and
              result.ok + shed == result.issued,
              f"{result.ok} answered + {shed} shed of {result.issued}; other {other}")
    out.check("answered p99 within the deadline", (out.p99_ms or 0.0) <= f.promises.answer_ms,
              f"p99 {out.p99_ms} ms vs {f.promises.answer_ms:g} ms", measured=True)
    return out
