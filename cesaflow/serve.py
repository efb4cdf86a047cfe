"""The production server: daphne, with request bodies limited as they arrive and never written to disk.

``python -m cesaflow.serve -v 0 -b 127.0.0.1 -p 8000 cesaflow.asgi:application`` takes daphne's own arguments;
``python -m cesaflow.serve runserver [addrport]`` is daphne's ``runserver`` (autoreload, static files) on the same
server, for ``make run``.

Why it exists: daphne calls the ASGI application only once Twisted has received a request's whole body, and Twisted
keeps that body in a temporary *file* whenever it is 100 KB or more, or chunked (``Request.gotLength`` in
``twisted.web.http``). A prompt, or a provider key posted chunked, would land on disk, and an unauthenticated
multi-gigabyte POST would fill memory and /tmp before any of our code ran; no ASGI middleware can prevent that, since
the application has not started. So the server's request class is ours (daphne's ``WebRequest`` with three of
Twisted's hooks overridden):

* ``gotLength`` (the headers are in): the body goes to memory (``io.BytesIO``), never a file; the route's limit is
  looked up in the one table (``settings.REQUEST_BODY_LIMITS``); a declared Content-Length over it is answered 413
  at once, before a byte of body is read, and without ``100 Continue``;
* ``handleContentChunk`` (body bytes, already de-chunked): counted; the chunk that passes the limit is answered 413
  and nothing more is kept;
* ``requestReceived`` (the whole body is in): handed to the application as it came, without Twisted's own parse of
  a POST's form fields, which daphne never reads and which answered a malformed ``multipart/form-data`` body with a
  bare 400 before the application could.

After a refusal the answer goes out, the connection is half-closed (the client reads a complete 413 and the end of
the stream), and whatever the client still sends is read and dropped for at most ``LINGER_SECONDS`` before the
socket closes: closing with unread data would make the kernel reset the connection, and a client still sending
could lose the answer. The answers are ``cesaflow.asgi.too_large_answer``, the same as the ASGI middleware's.

**Graceful shutdown** (SIGTERM or SIGINT; daphne speaks no ASGI lifespan): the server stops listening, then
``runs.executor.stop_server_runs`` runs within ``CESAFLOW_RUN_SHUTDOWN_GRACE_SECONDS`` — ``/readyz`` answers 503,
the inline executor's runs end or are recorded, open run streams close with a reason (websocket 4503, an SSE
``server_restarting`` event) so clients reconnect to another process, requests still being answered (gateway
completions mid-stream) may finish, and the gateway's run endings are written — before daphne cancels what is left.
"""

from __future__ import annotations

# First: daphne.server installs the asyncio Twisted reactor, which everything below must find installed.
import daphne.server  # isort: skip

import asyncio
import io
import logging
import sys
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import unquote

from daphne.cli import CommandLineInterface
from daphne.http_protocol import HTTPFactory, WebRequest
from daphne.management.commands.runserver import Command as DaphneRunserverCommand
from django.conf import settings
from twisted.internet import defer
from twisted.internet.interfaces import ITCPTransport

from cesaflow.asgi import too_large_answer  # sets Django up (settings, apps) like any import of the application
from cesaflow.lib.body_limit import body_limit, largest_body_limit
from runs.executor import stop_server_runs

logger = logging.getLogger("cesaflow.serve")

# How long a refused connection's remaining input is read and dropped before the socket closes.
LINGER_SECONDS: Final = 5.0


def _target_path(channel: Any) -> str | None:
    """The request's path, decoded as daphne decodes it for the ASGI scope. Twisted parses the request line before
    the headers but exposes it only on its channel (``_path``); None when a channel has none (an HTTP/2 stream)."""
    target = getattr(channel, "_path", None)
    if not isinstance(target, bytes):
        return None
    return unquote(target.split(b"?", 1)[0].decode("ascii", "replace"))


def _discard(data: bytes) -> None:
    """A refused connection's input: read (so the client can finish sending and read its 413) and dropped."""


class BoundedWebRequest(WebRequest):  # type: ignore[misc]  # daphne is untyped
    """daphne's request with its body in memory, limited per route as it arrives (see the module docstring)."""

    _limit_path: str = "/"
    _limit: int = 0
    _received: int = 0
    _refused: bool = False

    def gotLength(self, length: int | None) -> None:
        # Replaces Twisted's: a BytesIO, or above 100 KB (and when chunked) a TemporaryFile.
        self.content = io.BytesIO()
        path = _target_path(self.channel)
        self._limit_path = path or "/"
        # Without a path (no such channel is served today) the largest limit still bounds the body; the ASGI
        # middleware then applies the route's own.
        self._limit = body_limit(path) if path is not None else largest_body_limit()
        if length is not None and length > self._limit:
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._refuse()
            return
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return  # a refused body came to its end: there is no request for the application
        # Twisted would parse a POST body's form fields into ``self.args``, which daphne never reads (Django parses
        # the body), and answer a ``multipart/form-data`` body it cannot parse with a bare 400 of its own before the
        # application sees it. The body is the application's alone. (The parse also cost every JSON POST, the
        # gateway's included, about 55 µs and two classes built for the cyclic collector: its content type is read
        # through ``email``'s header registry.)
        self._parsePOSTFormSubmission = False
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._refused = True
        self.content = io.BytesIO()  # drop what was kept
        # Refused on the headers: Twisted must not invite the body with "100 Continue" once this returns.
        self.requestHeaders.removeHeader(b"expect")
        answer = too_large_answer(self._limit_path, self._limit).http_bytes()
        channel = self.channel
        transport = channel.transport
        transport.write(answer)
        # From now on the channel parses nothing (Twisted's own websocket upgrade replaces dataReceived likewise).
        channel.dataReceived = _discard
        if ITCPTransport.providedBy(transport):
            transport.loseWriteConnection()
            channel.callLater(LINGER_SECONDS, transport.loseConnection)  # the channel's clock: the reactor's
        else:
            transport.loseConnection()  # TLS terminated here cannot half-close (the proxy in front normally does)
        method = getattr(channel, "_command", b"-")
        address = self.getClientAddress()
        self.server.log_action(
            "http",
            "complete",
            {
                "path": self._limit_path,
                "status": 413,
                "method": method.decode("ascii", "replace") if isinstance(method, bytes) else "-",
                "client": f"{address.host}:{address.port}" if hasattr(address, "port") else None,
                "time_taken": 0.0,
                "size": len(answer),
            },
        )


class BoundedHTTPFactory(HTTPFactory):  # type: ignore[misc]  # daphne is untyped
    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        protocol.requestFactory = BoundedWebRequest
        return protocol


class BoundedServer(daphne.server.Server):  # type: ignore[misc]  # daphne is untyped
    """daphne's server with ``BoundedHTTPFactory``. ``Server.run`` builds daphne's factory itself, with no hook to
    pass another; this property takes that assignment and serves ours in its place."""

    @property
    def http_factory(self) -> BoundedHTTPFactory:
        return self._bounded_http_factory

    @http_factory.setter
    def http_factory(self, factory: HTTPFactory) -> None:
        self._bounded_http_factory = BoundedHTTPFactory(self)

    def listen_success(self, port: Any) -> None:
        self.__dict__.setdefault("_ports", []).append(port)
        super().listen_success(port)

    def kill_all_applications(self) -> Any:
        """Twisted's "before shutdown" step: drain gracefully first (module docstring), then daphne's own, which
        cancels whatever is still open."""
        drained = defer.Deferred.fromFuture(asyncio.ensure_future(self._drain()))
        drained.addErrback(lambda failure: logger.error("graceful shutdown failed: %s", failure.getErrorMessage()))
        drained.addBoth(lambda _: daphne.server.Server.kill_all_applications(self))
        return drained

    async def _drain(self) -> None:
        for port in self.__dict__.get("_ports", []):
            port.stopListening()
        open_before = self._open_instances()
        logger.info("shutting down: %d connections open", len(open_before))
        await stop_server_runs(
            grace_s=float(settings.RUN_SHUTDOWN_GRACE_SECONDS), wait_connections=self._wait_connections
        )

    def _open_instances(self) -> list[asyncio.Future[Any]]:
        return [
            instance
            for details in self.connections.values()
            if (instance := details.get("application_instance")) is not None and not instance.done()
        ]

    async def _wait_connections(self, timeout_s: float) -> None:
        pending = self._open_instances()
        if pending and timeout_s > 0:
            _done, left = await asyncio.wait(pending, timeout=timeout_s)
            if left:
                logger.warning("shutting down: %d connections still open after the grace period", len(left))


class BoundedCommandLineInterface(CommandLineInterface):  # type: ignore[misc]  # daphne is untyped
    server_class = BoundedServer


class DevelopmentServerCommand(DaphneRunserverCommand):  # type: ignore[misc]  # daphne is untyped
    server_cls = BoundedServer


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["runserver"]:
        DevelopmentServerCommand().run_from_argv(["manage.py", *args])
    else:
        BoundedCommandLineInterface().run(args)


if __name__ == "__main__":
    main()
