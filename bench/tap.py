"""A TCP tap between a proxy and the simulator that timestamps when the proxy hangs up on the provider.

The simulator records ``client_closed`` as a flag, without a time, and must not grow bench-only features. A tap in
the benchmark's own process (same monotonic clock as the client that disconnects) sees the proxy's FIN or RST on
the upstream socket at the moment the simulator would, and forwards it at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass
class TappedConnection:
    opened_at: float
    last_upstream_data_at: float = 0.0  # last bytes simulator -> proxy (the stream was live until then)
    proxy_closed_at: float | None = None  # the proxy's end closed (EOF or reset)


class Tap:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0
        self.connections: list[TappedConnection] = []
        self._server: asyncio.Server | None = None
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        record = TappedConnection(opened_at=time.perf_counter())
        self.connections.append(record)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(
                self._pump_from_proxy(reader, up_writer, record),
                self._pump_to_proxy(up_reader, writer, record),
            )
        finally:
            up_writer.close()
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _pump_from_proxy(
        self, reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter, record: TappedConnection
    ) -> None:
        try:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()
        except (ConnectionError, OSError):
            pass
        # The proxy hung up: stamp it and pass the hang-up on, exactly what the provider would see.
        record.proxy_closed_at = time.perf_counter()
        self._closed.set()
        up_writer.close()

    async def _pump_to_proxy(
        self, up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: TappedConnection
    ) -> None:
        try:
            while data := await up_reader.read(65536):
                record.last_upstream_data_at = time.perf_counter()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        writer.close()

    async def wait_for_close(self, *, since: float, timeout: float) -> float | None:
        """When a connection that was streaming at ``since`` was closed by the proxy; None if not in time."""
        deadline = time.perf_counter() + timeout
        while True:
            self._closed.clear()  # before looking, so a close landing meanwhile still wakes us
            for record in self.connections:
                if (
                    record.proxy_closed_at is not None
                    and record.proxy_closed_at >= since
                    and record.last_upstream_data_at >= since - 1.0
                ):
                    return record.proxy_closed_at
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._closed.wait(), remaining)
            except TimeoutError:
                return None

    def forget_closed(self) -> None:
        self.connections = [c for c in self.connections if c.proxy_closed_at is None]
