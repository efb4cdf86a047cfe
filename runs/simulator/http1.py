"""The simulator's HTTP/1.1 layer: request parsing with hard limits, chunked writes the server controls byte by
byte (``chunk``, ``split_points``), and a connection that notices at once when the client hangs up. Split out of
``runs.simulator.server``, which speaks the providers' dialects on top of it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024

STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    498: "Capacity Exceeded",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    529: "Overloaded",
}


class ClientGone(Exception):
    """The client closed its end while we were writing or waiting."""


class BadFraming(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.closed = asyncio.Event()  # the client went away (EOF or a failed write)
        self.aborted = False
        # The client's end of the TCP connection ("host:port"): requests with the same one came on one connection.
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else ""

    async def _fill(self) -> bool:
        data = await self.reader.read(65536)
        if not data:
            return False
        self.buffer += data
        return True

    async def read_request(self) -> Request | None:
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > MAX_HEADER_BYTES:
                raise BadFraming(431, "Request headers too large.")
            if not await self._fill():
                return None
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadFraming(400, "Malformed request line.")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadFraming(400, "Malformed header line.")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise BadFraming(411, "Chunked request bodies are not supported; send Content-Length.")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise BadFraming(400, "Invalid Content-Length.") from None
        if length < 0 or length > MAX_BODY_BYTES:
            raise BadFraming(413, "Request body too large.")
        while len(self.buffer) < length:
            if not await self._fill():
                return None
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        split = urlsplit(target)
        return Request(method, split.path, parse_qs(split.query), headers, body, keep_alive)

    async def watch_eof(self) -> None:
        """While streaming, the client sends nothing (no pipelining): EOF here means it hung up."""
        try:
            while await self._fill():
                pass
        except (ConnectionError, OSError):
            pass
        self.closed.set()

    async def write(self, data: bytes) -> None:
        if self.closed.is_set():
            raise ClientGone
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            self.closed.set()
            raise ClientGone from None

    async def pause(self, ms: int) -> None:
        """Sleep, but wake up (and stop) as soon as the client hangs up."""
        if ms <= 0:
            if self.closed.is_set():
                raise ClientGone
            return
        try:
            await asyncio.wait_for(self.closed.wait(), ms / 1000)
        except TimeoutError:
            return
        raise ClientGone


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


LAST_CHUNK = b"0\r\n\r\n"


def split_points(raw: bytes) -> list[int]:
    """Two cut points: one inside the first multi-byte UTF-8 character (if any), one in the middle."""
    cuts = {len(raw) // 2}
    for i, byte in enumerate(raw):
        if byte & 0xC0 == 0x80:  # a continuation byte: cutting here splits a character
            cuts.add(i)
            break
    return sorted(c for c in cuts if 0 < c < len(raw))
