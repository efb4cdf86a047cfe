"""``cesaflow.lib.http.body_bytes_received``: whether the next read of a streamed body returns without waiting, read
from httpcore's HTTP/1.1 connection with the pinned httpx, httpcore and h11 (issue #13: the gateway writes once per
wait, not once per HTTP chunk). A loopback server sends the body in controlled pieces; the client is the shared one,
through the egress guard, as the adapters use it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from cesaflow.lib.http import EgressPolicy, body_bytes_received, close_http_clients, get_http_client

HEAD_CHUNKED = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Upstream:
    """Answers one request with what the test sends, piece by piece (each piece one write)."""

    def __init__(self) -> None:
        self.pieces: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        while (piece := await self.pieces.get()) is not None:
            writer.write(piece)
            await writer.drain()
        writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/stream"


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    served = Upstream()
    served.server = await asyncio.start_server(served.handle, "127.0.0.1", 0)
    yield served
    served.pieces.put_nowait(None)
    served.server.close()
    await close_http_clients()


async def test_a_chunked_body_answers_whether_the_next_chunk_has_arrived(upstream):
    """What one socket read brought beyond the chunk handed out: a whole chunk, part of one, only a size line, only
    the last chunk. (Bytes still in the kernel's buffer count as not received: a read would have to fetch them.)"""
    client = get_http_client(EgressPolicy(allow_private=True))
    # Each piece is one write, and arrives in one socket read.
    upstream.pieces.put_nowait(HEAD_CHUNKED + chunk(b"data: 1\n\n") + chunk(b"data: 2\n\n") + b"9\r\n")
    async with client.stream("GET", upstream.url) as response:
        reads = response.aiter_raw()
        assert await anext(reads) == b"data: 1\n\n"
        assert body_bytes_received(response)  # the second chunk came with it: the next read will not wait
        assert await anext(reads) == b"data: 2\n\n"
        assert not body_bytes_received(response)  # the third chunk's size line, none of its data: a read waits

        upstream.pieces.put_nowait(b"data: 3\n\n\r\n" + b"9\r\ndata")  # the third chunk, then part of a fourth
        assert await anext(reads) == b"data: 3\n\n"
        assert body_bytes_received(response)  # part of the fourth chunk's data: a read returns it at once
        assert await anext(reads) == b"data"
        assert not body_bytes_received(response)

        upstream.pieces.put_nowait(b": 4\n\n\r\n0\r\n\r\n")  # the fourth chunk's rest, then the last chunk
        assert await anext(reads) == b": 4\n\n"
        assert not body_bytes_received(response)  # the last (empty) chunk is no data
        assert [piece async for piece in reads] == []


async def test_a_body_sized_by_content_length_answers_whether_any_byte_has_arrived(upstream):
    client = get_http_client(EgressPolicy(allow_private=True))
    # The head and half the body in one write.
    upstream.pieces.put_nowait(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nabcd")
    async with client.stream("GET", upstream.url) as response:
        assert body_bytes_received(response)  # half the body came with the head: the first read will not wait
        reads = response.aiter_raw()
        assert await anext(reads) == b"abcd"
        assert not body_bytes_received(response)
        upstream.pieces.put_nowait(b"efgh")
        assert await anext(reads) == b"efgh"
        assert not body_bytes_received(response)


async def test_a_response_not_from_httpcore_answers_no():
    async def body() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"

    response = httpx.Response(200, content=body())
    assert not body_bytes_received(response)
