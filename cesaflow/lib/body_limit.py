"""Request-body limits: the one table (``settings.REQUEST_BODY_LIMITS``), the 413 answer, and the ASGI enforcement
point.

A body is limited by the route it is sent to: the longest path prefix of the table that matches wins (``/`` is always
there). Two places enforce the same table, each counting bytes as they arrive and answering 413 before reading more:

* the server, ``cesaflow.serve`` (daphne with our Twisted request class): the declared Content-Length is checked
  before any body byte is read, a chunked body is cut the moment it passes the limit, and nothing is ever written
  to a temporary file. This is the one that protects production;
* ``BodyLimitMiddleware`` in the ASGI application (``cesaflow.asgi``), for any other ASGI server (uvicorn in the
  benchmark) and ASGI test clients. Under ``cesaflow.serve`` it never fires: the server has already refused.

Nothing here reads or keeps body bytes beyond counting them, and no answer quotes the request.
"""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from django.conf import settings

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]

_KIB: Final = 1024
_MIB: Final = 1024 * 1024
# An error page that needs nothing of the application (no template context, no nonce): only its stylesheet.
_PAGE: Final = (
    '<!doctype html>\n<html lang="en">\n<head><meta charset="utf-8"><title>413 · CesaFlow</title>'
    '<link rel="stylesheet" href="/static/css/app.css"></head>\n<body class="error-page"><main><h1>413</h1>'
    '<p>{message}</p><p><a href="/">Back to CesaFlow</a></p></main></body>\n</html>\n'
)
_PAGE_CSP: Final = b"default-src 'none'; style-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


def body_limit(path: str) -> int:
    """The largest request body accepted on ``path`` (a request's decoded path, as the ASGI scope has it)."""
    table: Mapping[str, int] = settings.REQUEST_BODY_LIMITS
    return table[max((prefix for prefix in table if path.startswith(prefix)), key=len)]


def largest_body_limit() -> int:
    return max(settings.REQUEST_BODY_LIMITS.values())


def declared_length(values: Iterable[bytes]) -> int | None:
    """The Content-Length a client declared (the header's values), or None when there is none (chunked) or it is not
    a plain number; the server refuses malformed lengths itself."""
    for value in values:
        value = value.strip()
        return int(value) if value.isdigit() else None
    return None


def describe_size(size: int) -> str:
    if size % _MIB == 0:
        return f"{size // _MIB} MiB"
    if size % _KIB == 0:
        return f"{size // _KIB} KiB"
    return f"{size:,} bytes"


def too_large_message(limit: int) -> str:
    """What every 413 for a body over ``limit`` says, whichever layer refuses it (webhook senders log it)."""
    return f"The request body is larger than the {describe_size(limit)} this endpoint accepts."


@dataclass(frozen=True)
class TooLarge:
    """A complete 413 answer: ``Connection: close`` (the rest of the body is never read), never cached."""

    content_type: bytes
    body: bytes
    extra_headers: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def json(cls, payload: Mapping[str, Any]) -> TooLarge:
        return cls(b"application/json", json.dumps(payload).encode())

    @classmethod
    def page(cls, message: str) -> TooLarge:
        return cls(
            b"text/html; charset=utf-8",
            _PAGE.format(message=html.escape(message)).encode(),
            ((b"content-security-policy", _PAGE_CSP), (b"x-frame-options", b"DENY")),
        )

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"content-type", self.content_type),
            (b"content-length", str(len(self.body)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
            *self.extra_headers,
            (b"connection", b"close"),
        ]

    def http_bytes(self) -> bytes:
        """The answer as HTTP/1.1 bytes, for a server writing it to the socket itself."""
        head = b"".join(name + b": " + value + b"\r\n" for name, value in self.headers)
        return b"HTTP/1.1 413 Content Too Large\r\n" + head + b"\r\n" + self.body


Answer = Callable[[str, int], TooLarge]


class BodyLimitMiddleware:
    """ASGI: the limit table enforced on ``http`` requests, by counting the ``http.request`` messages.

    A declared Content-Length over the limit is answered before the application runs or one message is received.
    Otherwise each body message is counted as the application receives it; the one that passes the limit is never
    handed over: the 413 is sent and the application receives ``http.disconnect`` instead (Django then stops
    without answering), and anything it sends afterwards is dropped. ``answer(path, limit)`` shapes the 413 for the
    route's clients.
    """

    def __init__(self, app: ASGIApp, *, answer: Answer) -> None:
        self.app = app
        self.answer = answer

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        limit = body_limit(path)
        declared = declared_length(
            value for name, value in scope.get("headers", ()) if name.lower() == b"content-length"
        )
        if declared is not None and declared > limit:
            await self._refuse(send, path, limit)
            return

        received = 0
        refused = False
        started = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await self._refuse(send, path, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if refused:
                return  # the 413 is the answer
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counted_receive, guarded_send)

    async def _refuse(self, send: Send, path: str, limit: int) -> None:
        answer = self.answer(path, limit)
        await send({"type": "http.response.start", "status": 413, "headers": answer.headers})
        await send({"type": "http.response.body", "body": answer.body})
