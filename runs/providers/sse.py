"""Incremental Server-Sent Events decoder (WHATWG event-stream rules, as the provider SDKs apply them).

Bytes arrive in arbitrary network chunks: a line, a CRLF pair or a multi-byte UTF-8 character may straddle two
chunks. Lines are split on bytes first (``\\r\\n``, ``\\n`` or ``\\r``) and decoded only once complete, so the
chunking never changes the events produced.
"""

from __future__ import annotations

from dataclasses import dataclass

# One SSE line larger than this is refused: it bounds the memory a misbehaving upstream can make us hold.
MAX_LINE_BYTES = 8 * 1024 * 1024


class SSEProtocolError(ValueError):
    """The byte stream is not a usable event stream (e.g. a line over the size cap)."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str
    data: str
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Feed bytes, get complete events. Call :meth:`end` at end of stream for an event missing its blank line."""

    def __init__(self, *, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._max_line_bytes = max_line_bytes
        self._partial: list[bytes] = []  # bytes of the current, unterminated line
        self._partial_len = 0
        self._skip_lf = False  # the previous chunk ended in "\r": a leading "\n" completes that CRLF
        self._first_line = True
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if not chunk:
            return []
        if b"\n" not in chunk and b"\r" not in chunk:
            self._append_partial(chunk)
            return []
        if self._partial:
            chunk = b"".join(self._partial) + chunk
            self._partial.clear()
            self._partial_len = 0
        lines = chunk.splitlines(keepends=True)
        last = lines[-1]
        if not last.endswith((b"\n", b"\r")):
            lines.pop()
            self._append_partial(last)
        elif last.endswith(b"\r"):
            # Maybe the first half of a CRLF whose "\n" is in the next chunk.
            self._skip_lf = True
        events: list[SSEEvent] = []
        for raw in lines:
            if len(raw) > self._max_line_bytes:
                raise SSEProtocolError("An event-stream line exceeds the size limit.")
            stripped = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            event = self._line(stripped.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

    def end(self) -> list[SSEEvent]:
        """End of stream. A final line without its line break may have been cut anywhere, so it is dropped; an
        event whose lines all arrived but whose blank line did not is still dispatched."""
        self._partial.clear()
        self._partial_len = 0
        event = self._line("")
        return [event] if event is not None else []

    def _append_partial(self, piece: bytes) -> None:
        self._partial.append(piece)
        self._partial_len += len(piece)
        if self._partial_len > self._max_line_bytes:
            raise SSEProtocolError("An event-stream line exceeds the size limit.")

    def _line(self, line: str) -> SSEEvent | None:
        if self._first_line:
            self._first_line = False
            if line.startswith("\ufeff"):
                line = line[1:]
        if not line:
            if not self._data and not self._event:
                self._id = None
                self._retry = None
                return None
            event = SSEEvent(event=self._event or "message", data="\n".join(self._data), id=self._id, retry=self._retry)
            self._event, self._data, self._retry = "", [], None
            return event
        if line.startswith(":"):
            return None  # comment / keep-alive
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None
