"""A TCP proxy on loopback that adds a round-trip delay and counts the bytes each way: an emulated WAN
between the agent (or a cloud-only client) and the gateway.

Every chunk read from one side is written to the other ``rtt_ms / 2`` after it arrived, in order, so a
gRPC call over it takes one ``rtt_ms`` longer and the link stays alive (not a timeout: a slow cloud).
It runs an asyncio loop in a thread of the bench; ``upstream_bytes`` is what clients sent towards the
server, as it would be billed on the uplink (HTTP/2 framing and TLS-less gRPC included).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time


class DelayProxy:
    """Listens on 127.0.0.1 (``port``), forwards to 127.0.0.1:``target_port`` with ``rtt_ms`` added."""

    def __init__(self, target_port: int, rtt_ms: float) -> None:
        self.target_port = target_port
        self.one_way_s = rtt_ms / 2000.0
        self.port = 0
        self.upstream_bytes = 0
        self.downstream_bytes = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxy", daemon=True)

    def start(self) -> DelayProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._connection, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer, upstream=True),
                             self._pipe(up_reader, writer, upstream=False))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool) -> None:
        """Reads chunks as they come and writes each one ``one_way_s`` after it arrived."""
        chunks: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while (item := await chunks.get()) is not None:
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if upstream:
                    self.upstream_bytes += len(data)
                else:
                    self.downstream_bytes += len(data)
                chunks.put_nowait((time.monotonic() + self.one_way_s, data))
        chunks.put_nowait(None)
        with contextlib.suppress(ConnectionError, OSError):
            await sender
        writer.close()

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
