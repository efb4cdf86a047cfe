"""A minimal HTTP/1.1 client on an asyncio Protocol, for measuring (not for products).

On a 2-core machine the load generator shares a core with the simulator, so its cost per SSE event decides how
many streams the harness can drive. httpx or asyncio streams wake a task for every network read (tens of
microseconds per paced event); here the bytes are parsed inside ``data_received`` (status, headers,
chunked/content-length/close-delimited bodies, SSE event boundaries) and the waiting task is woken once per
response. Timestamps are taken on arrival: the first content-bearing SSE event (time to first token) and,
when asked, every content event.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# A chat.completion.chunk whose delta carries non-empty text: `"content":"x` or `"content": "x`.
CHUNK_CONTENT_RE = re.compile(rb'"content":\s*"(?!")')
# A run's SSE event carrying text (``runs.api.sse``: compact JSON, so no space after the colon).
RUN_TEXT_RE = re.compile(rb'"type":"text\.delta"')


@dataclass
class Response:
    """What one request produced. Times are ``time.perf_counter()`` seconds."""

    status: int = 0
    sent_at: float = 0.0
    first_event_at: float | None = None  # first SSE event of any kind
    first_content_at: float | None = None  # first SSE event with non-empty delta text
    last_event_at: float | None = None
    events: int = 0  # SSE events (data lines ending in a blank line), [DONE] included
    content_events: int = 0
    body: bytes = b""  # non-streaming responses (and error bodies) only
    error: str | None = None
    content_times: list[float] = field(default_factory=list)  # filled only when asked (pacing checks)

    @property
    def ttft(self) -> float | None:
        return None if self.first_content_at is None else self.first_content_at - self.sent_at

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200


def chat_body(model: str, *, prompt: str = "Say something.") -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        separators=(",", ":"),
    ).encode()


def build_request(
    method: str,
    host: str,
    port: int,
    path: str,
    *,
    token: str,
    body: bytes = b"",
    accept: str = "text/event-stream, application/json",
) -> bytes:
    """The full request bytes, built once per scenario and written as is (no per-request formatting cost)."""
    lines = [
        f"{method} {path} HTTP/1.1",
        f"host: {host}:{port}",
        f"authorization: Bearer {token}",
        f"accept: {accept}",
        "user-agent: cesaflow-bench",
    ]
    if body or method == "POST":
        lines += ["content-type: application/json", f"content-length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class HttpError(Exception):
    """The server broke HTTP framing or the connection; the message says how."""


class _Parser:
    """Incremental parse of one response, fed from ``data_received``; resolves ``done`` at its end."""

    def __init__(
        self,
        result: Response,
        done: asyncio.Future[None],
        *,
        stop_after_content: int | None,
        record_content_times: bool,
        on_first_content: Callable[[], None] | None,
        content_re: re.Pattern[bytes],
    ) -> None:
        self.result = result
        self.content_re = content_re
        self.done = done
        self.stop_after_content = stop_after_content
        self.record_content_times = record_content_times
        self.on_first_content = on_first_content
        self.buffer = bytearray()
        self.state = "head"  # head -> chunk-size | chunk-data | chunk-end | length | eof -> finished
        self.remaining = 0
        self.streaming = False
        self.keep_alive = True
        self.sse = bytearray()
        self.body = bytearray()

    def finish(self, error: BaseException | None = None) -> None:
        if self.state != "finished":
            self.state = "finished"
            self.result.body = bytes(self.body)
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)

    def feed(self, data: bytes, now: float) -> None:
        self.buffer += data
        while self.state != "finished":
            if not self._step(now):
                return

    def eof(self) -> None:
        if self.state == "eof":
            self.finish()
        else:
            self.finish(HttpError("connection closed by the server"))

    def _step(self, now: float) -> bool:
        """Consume what the buffer allows; False when more bytes are needed."""
        buffer = self.buffer
        if self.state == "head":
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            self._head(bytes(buffer[:end]).decode("latin-1").split("\r\n"))
            del buffer[: end + 4]
            return True
        if self.state == "chunk-size":
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(bytes(buffer[:line_end]).split(b";", 1)[0], 16)
            del buffer[: line_end + 2]
            self.remaining = size
            self.state = "chunk-data" if size else "chunk-end"
            return True
        if self.state == "chunk-data":
            if len(buffer) < self.remaining + 2:
                return False
            data = bytes(buffer[: self.remaining])
            del buffer[: self.remaining + 2]
            self.state = "chunk-size"
            self._body(data, now)
            return True
        if self.state == "chunk-end":
            # The last chunk: no trailers expected, just the final CRLF.
            if len(buffer) < 2:
                return False
            del buffer[:2]
            self.finish()
            return False
        if self.state == "length":
            take = min(self.remaining, len(buffer))
            data = bytes(buffer[:take])
            del buffer[:take]
            self.remaining -= take
            self._body(data, now)
            if self.remaining == 0:
                self.finish()
            return False
        if self.state == "eof":
            data = bytes(buffer)
            buffer.clear()
            self._body(data, now)
            return False
        return False

    def _head(self, lines: list[str]) -> None:
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise HttpError(f"bad status line {lines[0][:60]!r}")
        self.result.status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.keep_alive = headers.get("connection", "").lower() != "close" and parts[0] == "HTTP/1.1"
        self.streaming = self.result.status == 200 and headers.get("content-type", "").startswith("text/event-stream")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.state = "chunk-size"
        elif "content-length" in headers:
            self.remaining = int(headers["content-length"])
            self.state = "length"
            if self.remaining == 0:
                self.finish()
        else:
            self.keep_alive = False
            self.state = "eof"

    def _body(self, data: bytes, now: float) -> None:
        if not self.streaming:
            self.body += data
            return
        result = self.result
        sse = self.sse
        sse += data
        if b"\r" in sse:
            sse[:] = sse.replace(b"\r\n", b"\n")
        while (cut := sse.find(b"\n\n")) >= 0:
            event = bytes(sse[:cut])
            del sse[: cut + 2]
            if b"data:" not in event:
                continue  # a comment or keep-alive, not an event
            result.events += 1
            result.last_event_at = now
            if result.first_event_at is None:
                result.first_event_at = now
            if self.content_re.search(event) is None:
                continue
            result.content_events += 1
            if result.first_content_at is None:
                result.first_content_at = now
                if self.on_first_content is not None:
                    self.on_first_content()
            if self.record_content_times:
                result.content_times.append(now)
            if self.stop_after_content is not None and result.content_events >= self.stop_after_content:
                self.keep_alive = False  # the rest is left unread: this connection is done
                self.finish()
                return


class _Protocol(asyncio.Protocol):
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def data_received(self, data: bytes) -> None:
        self.connection.received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.lost()


class Connection:
    """One keep-alive connection. Not concurrency-safe: one request at a time, like a browser's socket."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.parser: _Parser | None = None
        self.reusable = False

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(lambda: _Protocol(self), self.host, self.port)
        self.transport = transport
        self.reusable = True

    def close(self) -> None:
        """Close our end (FIN), the way a client that gives up does."""
        if self.transport is not None:
            self.transport.close()
        self.transport = None
        self.reusable = False

    def received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or parser.state == "finished":
            return  # bytes after a response we stopped reading: ignored, the connection is not reused
        try:
            parser.feed(data, time.perf_counter())
        except (HttpError, ValueError) as exc:
            parser.finish(exc)

    def lost(self) -> None:
        self.reusable = False
        self.transport = None
        if self.parser is not None:
            self.parser.eof()

    async def request(
        self,
        raw: bytes,
        *,
        stop_after_content: int | None = None,
        record_content_times: bool = False,
        on_first_content: Callable[[], None] | None = None,
        content_re: re.Pattern[bytes] = CHUNK_CONTENT_RE,
        timeout: float = 30.0,
    ) -> Response:
        """Send ``raw`` and read the whole response (or stop after N content events, leaving it unread).
        ``content_re`` tells a content event (an OpenAI chunk with text; ``RUN_TEXT_RE`` for a run's stream).

        Errors (and timeouts) are returned in ``Response.error``, never raised: a load loop counts them and
        carries on. Every request is bounded by ``timeout`` seconds.
        """
        for attempt in range(2):
            result = Response()
            reused = self.reusable and self.transport is not None
            try:
                async with asyncio.timeout(timeout):
                    if not reused:
                        await self.open()
                    assert self.transport is not None
                    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    self.parser = _Parser(
                        result,
                        done,
                        stop_after_content=stop_after_content,
                        record_content_times=record_content_times,
                        on_first_content=on_first_content,
                        content_re=content_re,
                    )
                    result.sent_at = time.perf_counter()
                    self.transport.write(raw)
                    await done
                if not self.parser.keep_alive:
                    self.close()
            except (HttpError, OSError, ValueError, TimeoutError) as exc:
                result.error = f"{type(exc).__name__}: {exc}"[:200]
                self.close()
                # A kept-alive socket the server timed out while idle fails before any response byte: retry
                # once on a fresh connection, as every HTTP client does.
                if reused and attempt == 0 and result.status == 0 and not isinstance(exc, TimeoutError):
                    continue
            return result
        raise AssertionError("unreachable")
