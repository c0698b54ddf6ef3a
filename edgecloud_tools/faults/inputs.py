"""Faults in what clients send: frames from a dead or saturated sensor, a BYTES bomb, and request ids
two devices (or one careless app) share."""

from __future__ import annotations

import struct
import threading
import time
from collections import Counter

import grpc
import numpy as np

from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud.client import KServeClient
from edgecloud.endpoint import free_loopback_port
from edgecloud_tools.faults.harness import Load, escalate, stored_rows
from edgecloud_tools.faults.plan import Faults, Outcome, progress
from edgecloud_tools.faults.serving import REPLAY_TIMEOUT_S
from edgecloud_tools.rig import servers
from edgecloud_tools.rig.services import wait_until

#: a BYTES bomb's size: just under the agent's largest accepted request (16 MiB)
BOMB_BYTES = 16_000_000
#: frames per kind of bad frame
FRAMES = 20
#: request ids each device numbers its frames with, as the issue's two apps did
DEVICES = ("line-a", "line-b")
IDS_PER_DEVICE = 50


def _frames(images: np.ndarray) -> dict[str, np.ndarray]:
    """Real patches spoilt as a dead or saturated sensor spoils them, and one outside the card's range."""
    inf = np.full_like(images, np.inf)
    nan_pixel, minus_inf, bright = images.copy(), images.copy(), images.copy()
    nan_pixel[:, 0, 16, 16] = np.nan
    minus_inf[:, 0, 3, 4] = -np.inf
    bright[:, 0, 8, 8] = 5.0  # the card's range is [0, 1]
    return {"all +Inf": inf, "one NaN pixel": nan_pixel, "one -Inf pixel": minus_inf,
            "a pixel at 5.0 (range [0, 1])": bright}


def nan_frames(f: Faults) -> Outcome:
    out = Outcome("nan_frames", "a frame holding NaN or ±Inf is refused with INVALID_ARGUMENT naming the "
                  "tensor and the row; a frame outside the card's range is never answered confidently "
                  "(it escalates, and is degraded with the cloud away)")
    d = f.dir("nan-frames")
    agent = servers.agent(d, f.models.edge, "nan-1", cloud=free_loopback_port(), device_id="nan-1")
    kinds = _frames(f.images(FRAMES))
    answered = failed = degraded = 0
    with agent, servers.RssSampler(agent.proc.pid) as rss:
        for kind, frames in kinds.items():
            load = Load(agent.port, f.models.edge_name, f.input["name"], frames, kind, 2,
                        max_calls=FRAMES).start().join()
            codes = Counter(c.code for c in load.calls)
            answered += codes["OK"]
            failed += len(load.calls) - codes["OK"]
            degraded += sum(c.degraded for c in load.calls)
            if kind.startswith("a pixel"):
                confident = [c for c in load.calls if c.code == "OK" and not c.degraded]
                out.check(f"{kind}: answered, never confidently by the edge", codes["OK"] == FRAMES and
                          not confident, f"{codes['OK']}/{FRAMES} answered, {len(confident)} confident")
                continue
            tensor = f"'{f.input['name']}'"
            named = [c for c in load.calls
                     if c.code == "INVALID_ARGUMENT" and tensor in c.detail and "row" in c.detail]
            out.figures[kind] = load.calls[0].detail if load.calls else ""
            out.check(f"{kind}: INVALID_ARGUMENT naming the tensor and the row", len(named) == FRAMES,
                      f"{len(named)}/{FRAMES} ({dict(codes)})")
    out.rss_before_bytes, out.rss_peak_bytes = rss.before, rss.peak
    out.answered, out.failed, out.degraded = answered, failed, degraded
    return out


def _bomb(model: str, input_name: str, datatype: str) -> pb.ModelInferRequest:
    """One request of 2-byte BYTES elements (4-byte length prefix each) filling ``BOMB_BYTES``."""
    n = BOMB_BYTES // 6
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype=datatype, shape=[n])
    request.raw_input_contents.append((struct.pack("<I", 2) + b"ab") * n)
    return request


def bytes_bomb(f: Faults) -> Outcome:
    out = Outcome("bytes_bomb", f"{f.plan.bombs} requests of {BOMB_BYTES / 1e6:g} MB of 2-byte BYTES "
                  "elements at once (to a missing model, and as the wrong datatype to the real one): each "
                  f"refused within {f.promises.bomb_s:g} s, the agent's memory bounded, another app's "
                  "calls answered in time")
    d, plan = f.dir("bytes-bomb"), f.plan
    agent = servers.agent(d, f.models.edge, "bomb-1", device_id="bomb-1")
    bombs = [_bomb("no-such-model", f.input["name"], "BYTES") if i % 2 == 0 else
             _bomb(f.models.edge_name, f.input["name"], "BYTES") for i in range(plan.bombs)]
    results: list[tuple[str, float]] = []

    def send(request: pb.ModelInferRequest) -> None:
        with KServeClient(f"127.0.0.1:{agent.port}") as client:
            started = time.monotonic()
            try:
                client.stub.ModelInfer(request, timeout=60)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            results.append((code, time.monotonic() - started))

    with agent, servers.RssSampler(agent.proc.pid, 0.01) as rss:
        app = Load(agent.port, f.models.edge_name, f.input["name"], f.images(16), "app", 1,
                   params=escalate("never"), pause_s=0.005).start()
        app.wait_done(20)
        threads = [threading.Thread(target=send, args=(b,)) for b in bombs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        time.sleep(0.2)
        app.stop()
    out.rss_before_bytes, out.rss_peak_bytes = rss.before, rss.peak
    app.record(out, f.promises.answer_ms)
    codes = Counter(code for code, _ in results)
    slowest = max((s for _, s in results), default=None)
    out.figures.update(bomb_codes=dict(codes), slowest_bomb_s=None if slowest is None else round(slowest, 3))
    progress(f"bytes bomb: {dict(codes)}, slowest {slowest:.2f} s")
    out.check("every bomb refused with NOT_FOUND or INVALID_ARGUMENT",
              codes["NOT_FOUND"] + codes["INVALID_ARGUMENT"] == plan.bombs, str(dict(codes)))
    out.check("each refused in time", slowest is not None and slowest <= f.promises.bomb_s,
              f"slowest {slowest:.3f} s vs {f.promises.bomb_s:g} s", measured=True)
    growth, bound = rss.peak - rss.before, f.promises.bomb_rss_factor * plan.bombs * BOMB_BYTES
    out.check("the agent's memory bounded", growth <= bound,
              f"+{growth / 1e6:.1f} MB vs {bound / 1e6:.0f} MB ({f.promises.bomb_rss_factor:g}x the bombs)",
              measured=True)
    out.check("the other app's calls answered", out.failed == 0, f"{out.failed} failed")
    out.check("the other app's calls answered in time", (out.p99_ms or 0.0) <= f.promises.answer_ms,
              f"p99 {out.p99_ms} ms vs {f.promises.answer_ms:g} ms", measured=True)
    return out


def duplicate_ids(f: Faults) -> Outcome:
    out = Outcome("duplicate_ids", "two devices both numbering their requests "
                  f"frame-0..{IDS_PER_DEVICE - 1}, and an app reusing one id for {IDS_PER_DEVICE} images: "
                  "the store keeps every row")
    d = f.dir("duplicate-ids")
    gateway = servers.gateway(d, f.models.repository, "gw", store=True)
    store = d / "gw-hard-examples.db"
    images = f.images(3 * IDS_PER_DEVICE)
    loads: list[Load] = []
    with gateway, servers.RssSampler(gateway.proc.pid) as rss:
        agents = [servers.agent(d, f.models.edge, device, cloud=gateway.port, device_id=device)
                  for device in DEVICES]
        with agents[0], agents[1]:
            for k, agent in enumerate(agents):
                part = images[k * IDS_PER_DEVICE:(k + 1) * IDS_PER_DEVICE]
                loads.append(Load(agent.port, f.models.edge_name, f.input["name"], part, "frame", 2,
                                  max_calls=IDS_PER_DEVICE, params=escalate("always")).start().join())
            reused = images[2 * IDS_PER_DEVICE:]
            loads.append(Load(agents[0].port, f.models.edge_name, f.input["name"], reused, "frame-reused",
                              2, max_calls=IDS_PER_DEVICE, params=escalate("always"),
                              same_id=True).start().join())
            want = {(DEVICES[0], f"frame-{i}"): 1 for i in range(IDS_PER_DEVICE)}
            want.update({(DEVICES[1], f"frame-{i}"): 1 for i in range(IDS_PER_DEVICE)})
            want[(DEVICES[0], "frame-reused")] = IDS_PER_DEVICE
            wait_until(lambda: sum(stored_rows(store).values()) >= sum(want.values()), REPLAY_TIMEOUT_S, 0.2)
    rows = stored_rows(store)
    out.rss_before_bytes, out.rss_peak_bytes = rss.before, rss.peak
    out.figures["rss_of"] = "gateway"
    calls = [c for load in loads for c in load.calls]
    out.answered = sum(c.code == "OK" for c in calls)
    out.failed, out.degraded = len(calls) - out.answered, sum(c.degraded for c in calls)
    out.stored = sum(min(rows.get(k, 0), n) for k, n in want.items())
    out.expected = sum(want.values())
    reused_warnings = (d / "gw.log").read_text(errors="replace").count("event=request_id_reused")
    out.figures.update(per_device={dev: sum(n for (device, _), n in rows.items() if device == dev)
                                   for dev in DEVICES}, reuse_warnings=reused_warnings)
    out.check("no call failed", out.failed == 0, f"{out.failed} failed")
    out.check("every device's rows and every reused id's rows stored, once each",
              all(rows.get(k, 0) == n for k, n in want.items()), f"{out.stored}/{out.expected}")
    out.check("a reused id is warned about", reused_warnings > 0, f"{reused_warnings} warnings")
    return out
