"""A load-generating client process: what a local app (or many devices) would send, timed per call.

Run as ``python -m edgecloud_tools.rig.loadgen``; it reads one JSON spec per line on stdin, prepares
(connects, one untimed call per connection), writes ``{"ready": true}``, waits for the line ``go`` so
that every client process of a run starts together, runs the pattern and writes one JSON result line.

Clients (``spec["client"]``):
- ``triton``: tritonclient's asyncio gRPC client, the KServe v2 client local apps use;
- ``http``: KServe v2 JSON over HTTP/1.1 keep-alive connections (for the FastAPI peer);
- ``bare``: raw bytes over a gRPC unary call, the bytes of the same KServe v2 request (bare echo).

With ``spec["frames"]`` (``{"size": [H, W], "quality": Q}``) the triton client sends each image as a
camera's JPEG frame of that size in the BYTES input instead of its tensor.

Patterns (``spec["pattern"]``):
- ``closed``: ``streams`` calls in flight, each sent when the previous one answered, for ``warmup_s``
  untimed and then ``duration_s`` timed (the calls that end in that window are counted);
- ``open``: calls sent at a fixed ``rate`` per second for ``duration_s`` whatever the answers, each with
  a ``timeout_s``: shows queueing and shedding that a closed loop hides;
- ``sequence``: the ``data`` images one at a time in order, with each answer's top-1 class and flags
  (for accuracy).

Every loop is bounded in calls (``max_calls``) and in time, and only ever targets 127.0.0.1. This module
never imports edgecloud's generated stubs: tritonclient bundles its own ``inference`` descriptors.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from edgecloud_tools.camera_frames import camera_frame
from edgecloud_tools.toolchain.dataset import make_split

#: largest message either way, as the services allow
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: connections a client process opens at most; more streams share them round robin
MAX_CONNECTIONS = 32


@dataclass
class Reply:
    """What the bench keeps of one answer: its top-1 class (sequence runs) and its true bool flags."""

    top1: int | None = None
    flags: tuple[str, ...] = ()


class CallError(Exception):
    """A failed call, with its status code name (RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, HTTP_503…)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


Call = Callable[[int, int], Awaitable[Reply]]  # (connection index, image index) -> reply


def _loopback(target: str) -> str:
    if target.rpartition(":")[0] != "127.0.0.1":
        raise SystemExit(f"loadgen: refusing target {target!r}: only 127.0.0.1 is allowed")
    return target


@dataclass
class Tally:
    """Counts and latencies of one run in this process."""

    ok: int = 0
    issued: int = 0
    errors: Counter = field(default_factory=Counter)
    flags: Counter = field(default_factory=Counter)
    latency_ms: list[float] = field(default_factory=list)
    top1: list[int | None] = field(default_factory=list)
    flag_rows: list[list[str]] = field(default_factory=list)
    #: open loop: how long sending took (longer than the duration when this process fell behind)
    issued_s: float | None = None

    def add(self, started: float, reply: Reply | None, error: str | None, timed: bool = True) -> None:
        if not timed:
            return
        if error is not None:
            self.errors[error] += 1
            return
        self.ok += 1
        self.latency_ms.append(round((time.perf_counter() - started) * 1000.0, 4))
        self.flags.update(reply.flags)


async def _one(call: Call, conn: int, image: int) -> tuple[Reply | None, str | None]:
    try:
        return await call(conn, image), None
    except CallError as e:
        return None, e.code
    except asyncio.TimeoutError:
        return None, "DEADLINE_EXCEEDED"
    except OSError as e:
        return None, f"OS_{type(e).__name__}"


# -- clients ------------------------------------------------------------------------------------------


async def triton_client(spec: dict, images: np.ndarray) -> tuple[Call, Callable[[], Awaitable[None]]]:
    import tritonclient.grpc.aio as tc
    from tritonclient.utils import InferenceServerException

    args = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.use_local_subchannel_pool", 1)]
    clients = [tc.InferenceServerClient(_loopback(spec["target"]), channel_args=args)
               for _ in range(spec["connections"])]
    name, datatype = spec["input"]["name"], spec["input"]["datatype"]
    frames = spec.get("frames")
    inputs = []
    for image in images:
        if frames:
            data = np.array([camera_frame(image, tuple(frames["size"]), frames["quality"])], dtype=np.object_)
        else:
            data = image[None]
        one = tc.InferInput(name, list(data.shape), datatype)
        one.set_data_from_numpy(data)
        inputs.append([one])
    outputs = [tc.InferRequestedOutput(spec["output"])] if spec.get("output") else None
    params, flag_keys, timeout = spec.get("params") or None, spec.get("flags", ()), spec["timeout_s"]

    async def call(conn: int, image: int) -> Reply:
        try:
            result = await clients[conn].infer(spec["model"], inputs[image], outputs=outputs,
                                               parameters=params, client_timeout=timeout)
        except InferenceServerException as e:
            raise CallError(str(e.status() or "UNKNOWN").rpartition(".")[2]) from None
        got = result.get_response().parameters
        flags = tuple(k for k in flag_keys if k in got and got[k].bool_param)
        top1 = int(np.argmax(result.as_numpy(spec["output"])[0])) if spec.get("output") else None
        return Reply(top1, flags)

    async def close() -> None:
        for c in clients:
            await c.close()

    return call, close


async def bare_client(spec: dict, images: np.ndarray) -> tuple[Call, Callable[[], Awaitable[None]]]:
    import grpc
    from tritonclient.grpc import service_pb2

    args = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(_loopback(spec["target"]), options=args)
                for _ in range(spec["connections"])]
    methods = [ch.unary_unary(spec["method"]) for ch in channels]
    payloads = []
    for image in images:
        request = service_pb2.ModelInferRequest(model_name=spec["model"])
        request.inputs.add(name=spec["input"]["name"], datatype=spec["input"]["datatype"],
                           shape=[1, *image.shape])
        request.raw_input_contents.append(np.ascontiguousarray(image).tobytes())
        for key, value in (spec.get("params") or {}).items():
            request.parameters[key].string_param = value
        payloads.append(request.SerializeToString())

    async def call(conn: int, image: int) -> Reply:
        try:
            await methods[conn](payloads[image], timeout=spec["timeout_s"])
        except grpc.aio.AioRpcError as e:
            raise CallError(e.code().name) from None
        return Reply()

    async def close() -> None:
        for ch in channels:
            await ch.close()

    return call, close


async def http_client(spec: dict, images: np.ndarray) -> tuple[Call, Callable[[], Awaitable[None]]]:
    host, _, port = _loopback(spec["target"]).rpartition(":")
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(spec["connections"])]
    locks = [asyncio.Lock() for _ in conns]
    name, datatype = spec["input"]["name"], spec["input"]["datatype"]
    requests = []
    for image in images:
        body = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": [1, *image.shape],
                                       "data": image.ravel().tolist()}]}).encode()
        head = (f"POST {spec['path']} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        requests.append(head + body)

    async def exchange(conn: int, image: int) -> None:
        reader, writer = conns[conn]
        writer.write(requests[image])
        await writer.drain()
        status_line, *headers = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        length = next((int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")),
                      None)
        if length is None:
            raise CallError("HTTP_NO_LENGTH")
        await reader.readexactly(length)
        status = int(status_line.split()[1])
        if status != 200:
            raise CallError(f"HTTP_{status}")

    async def call(conn: int, image: int) -> Reply:
        async with locks[conn]:  # one request at a time per HTTP/1.1 connection
            try:
                await asyncio.wait_for(exchange(conn, image), spec["timeout_s"])
            except asyncio.TimeoutError:  # the late answer would be read as the next one's: reconnect
                conns[conn][1].close()
                conns[conn] = await asyncio.open_connection(host, int(port))
                raise
        return Reply()

    async def close() -> None:
        for _, writer in conns:
            writer.close()

    return call, close


CLIENTS = {"triton": triton_client, "bare": bare_client, "http": http_client}


# -- patterns -----------------------------------------------------------------------------------------


async def closed_loop(call: Call, spec: dict, n_images: int) -> Tally:
    tally = Tally()
    start = time.perf_counter()
    timed_from, stop_at = start + spec["warmup_s"], start + spec["warmup_s"] + spec["duration_s"]
    budget = [spec["max_calls"]]

    async def stream(k: int) -> None:
        i = k
        while budget[0] > 0 and time.perf_counter() < stop_at:
            budget[0] -= 1
            began = time.perf_counter()
            reply, error = await _one(call, k % spec["connections"], (spec["offset"] + i) % n_images)
            tally.add(began, reply, error, timed=timed_from <= time.perf_counter() <= stop_at)
            i += spec["streams"]

    await asyncio.gather(*(stream(k) for k in range(spec["streams"])))
    return tally


async def open_loop(call: Call, spec: dict, n_images: int) -> Tally:
    tally = Tally()
    rate, total = spec["rate"], min(spec["max_calls"], int(spec["rate"] * spec["duration_s"]))
    tasks = []

    async def one(i: int) -> None:
        began = time.perf_counter()
        reply, error = await _one(call, i % spec["connections"], (spec["offset"] + i) % n_images)
        tally.add(began, reply, error)

    start = time.perf_counter()
    for i in range(total):
        wait = start + i / rate - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.ensure_future(one(i)))
        tally.issued += 1
    tally.issued_s = time.perf_counter() - start
    _, unanswered = await asyncio.wait(tasks, timeout=spec["timeout_s"] + 5.0)
    for task in unanswered:  # past the client's own timeout: counted, not waited for
        task.cancel()
    if unanswered:
        tally.errors["NO_ANSWER"] += len(unanswered)
    return tally


async def sequence(call: Call, spec: dict, n_images: int) -> Tally:
    tally = Tally()
    for i in range(min(n_images, spec["max_calls"])):
        began = time.perf_counter()
        reply, error = await _one(call, 0, i)
        tally.add(began, reply, error)
        tally.top1.append(reply.top1 if reply else None)
        tally.flag_rows.append(list(reply.flags) if reply else [])
        if error is not None:
            tally.latency_ms.append(float("nan"))
    return tally


PATTERNS = {"closed": closed_loop, "open": open_loop, "sequence": sequence}


def _images(data: dict) -> np.ndarray:
    images, _ = make_split(data["split"], data["n"])
    return images.astype(np.float32)


async def run(spec: dict, lines: asyncio.Queue) -> dict:
    images = _images(spec["data"])
    call, close = await CLIENTS[spec["client"]](spec, images)
    try:
        # connect and warm every connection, untimed
        await asyncio.gather(*(_one(call, c, c % len(images)) for c in range(spec["connections"])))
        _say({"ready": True})
        if await lines.get() != "go":
            return {"error": "run aborted before it started"}
        tally = await PATTERNS[spec["pattern"]](call, spec, len(images))
    finally:
        await close()
    return {"ok": tally.ok, "issued": tally.issued, "errors": dict(tally.errors), "flags": dict(tally.flags),
            "latency_ms": tally.latency_ms, "top1": tally.top1, "flag_rows": tally.flag_rows,
            "issued_s": tally.issued_s}


def _say(message: dict) -> None:
    sys.stdout.write(json.dumps(message, allow_nan=True) + "\n")
    sys.stdout.flush()


async def main() -> None:
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.strip())
        loop.call_soon_threadsafe(lines.put_nowait, "")

    loop.run_in_executor(None, read_stdin)
    while (line := await lines.get()) != "":
        try:
            _say(await run(json.loads(line), lines))
        except Exception as e:  # reported to the bench, which names the stage
            _say({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    asyncio.run(main())
