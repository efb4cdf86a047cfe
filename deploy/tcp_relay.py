"""Smoke tests only: relay TCP connections from 0.0.0.0:<listen> to 127.0.0.1:<target> in the same container.

The provider simulator listens on loopback only; deploy/compose.smoke.yaml runs this beside it so the worker can
reach it over the compose network. ``python deploy/tcp_relay.py 8766 8765``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: int) -> None:
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
    except OSError:
        writer.close()
        return
    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    for stream in (writer, up_writer):
        stream.close()
        with contextlib.suppress(OSError):
            await stream.wait_closed()


async def _main(listen: int, target: int) -> None:
    server = await asyncio.start_server(lambda r, w: _handle(r, w, target), "0.0.0.0", listen)  # noqa: S104 - a container's own network
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1]), int(sys.argv[2])))
