"""A minimal websocket client (RFC 6455) for measuring a run's stream on ``/ws/runs/<id>/``.

Hand-written because the project's environment has no client library to use: ``websockets`` and ``wsproto`` are
not installed (and the benchmark adds no dependencies), and the one websocket implementation that is there,
autobahn, comes with daphne as the *server's* dependency and wants txaio and callback protocol classes for a
client. What is measured needs little: the opening handshake (with the org API key and an Origin the server's
origin check accepts), unmasked text frames from the server (fragmented or not), pings answered, masked frames
out, the closing handshake. No extensions, no subprotocols, loopback only.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import ssl
import struct
import time

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
MAX_MESSAGE_BYTES = 1 << 20

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class WebSocketError(Exception):
    """The handshake was refused or the server broke the framing; the message says how."""


class WebSocketClosed(Exception):
    """The server closed the socket; ``code`` is its close code (1005 when it gave none)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"closed by the server with code {code}")
        self.code = code


def _frame(opcode: int, payload: bytes) -> bytes:
    """A single client frame: FIN set, masked (RFC 6455 5.3: every client frame is)."""
    head = bytes([0x80 | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


class WebSocket:
    """One client connection. ``connect`` returns once the server answered 101 with the right accept key."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.handshake_sent_at = 0.0

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        path: str,
        *,
        headers: dict[str, str],
        tls: ssl.SSLContext | None = None,
        local_addr: tuple[str, int] | None = None,
    ) -> WebSocket:
        """Open a websocket (``wss`` with ``tls``: ``host`` is then also the name the certificate must carry)."""
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname=host if tls else None, local_addr=local_addr
        )
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"host: {host}:{port}",
            "upgrade: websocket",
            "connection: Upgrade",
            f"sec-websocket-key: {key}",
            "sec-websocket-version: 13",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        socket = cls(reader, writer)
        # The clock starts when the request is written: the TCP connect (loopback) is not the server's time.
        socket.handshake_sent_at = time.perf_counter()
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            writer.close()
            raise WebSocketError("no handshake answer") from exc
        status, *header_lines = head.decode("latin-1").split("\r\n")
        answer = {n.strip().lower(): v.strip() for n, _, v in (h.partition(":") for h in header_lines if h)}
        expected = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()  # noqa: S324 - RFC 6455
        if not status.startswith("HTTP/1.1 101") or answer.get("sec-websocket-accept") != expected:
            writer.close()
            raise WebSocketError(f"handshake refused: {status[:60]!r}")
        return socket

    async def _read_frame(self) -> tuple[bool, int, bytes]:
        first, second = await self.reader.readexactly(2)
        if second & 0x80:
            raise WebSocketError("the server masked a frame")
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
        if size > MAX_MESSAGE_BYTES:
            raise WebSocketError(f"frame of {size} bytes")
        return bool(first & 0x80), first & 0x0F, await self.reader.readexactly(size)

    async def receive_text(self) -> str:
        """The next text message (pings answered on the way). Raises ``WebSocketClosed`` when the server closes."""
        parts: list[bytes] = []
        while True:
            try:
                fin, opcode, payload = await self._read_frame()
            except asyncio.IncompleteReadError as exc:
                raise WebSocketClosed(1006) from exc
            if opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self._send(OP_CLOSE, payload[:2])
                raise WebSocketClosed(code)
            if opcode == OP_PING:
                self._send(OP_PONG, payload)
                continue
            if opcode == OP_PONG:
                continue
            if opcode not in (OP_TEXT, OP_CONTINUATION):
                raise WebSocketError(f"unexpected opcode {opcode}")
            parts.append(payload)
            if fin:
                return b"".join(parts).decode()

    def send_text(self, text: str) -> None:
        self._send(OP_TEXT, text.encode())

    def _send(self, opcode: int, payload: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(_frame(opcode, payload))

    async def close(self, code: int = 1000, *, timeout: float = 2.0) -> None:
        """Closing handshake: send close, wait (bounded) for the server's, then drop the TCP connection."""
        self._send(OP_CLOSE, struct.pack("!H", code))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    _, opcode, _ = await self._read_frame()
                    if opcode == OP_CLOSE:
                        break
        except (TimeoutError, asyncio.IncompleteReadError, WebSocketError, OSError):
            pass
        self.writer.close()
