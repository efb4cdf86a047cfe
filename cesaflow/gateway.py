"""The gateway's lean request path: the OpenAI-compatible endpoint (``/api/v1/chat/completions``,
``/api/v1/models``) is what IDEs and SDKs call on every keystroke-sized request, so it skips what it never uses.

These views authenticate with org API keys only (``orgs.authentication``, through ``runs.api.proxy_views``), are
CSRF-exempt and render nothing: no session, CSRF, login redirect, messages or template middleware applies to
them. They keep what every response needs: the security headers, the request context (request id, client IP,
user agent for the audit trail) and the CSP header. ``cesaflow.asgi`` routes exactly these paths here; everything
else takes Django's full chain (``PageASGIHandler``, below), with the same header middleware on the loop.

No thread hop outside the views' own database work: the middleware here is pure header work (settings in, headers
out: no I/O, no database), so the Django ``MiddlewareMixin`` classes among it (``ON_THE_LOOP``) have their
``process_request`` and ``process_response`` called on the event loop rather than sent to a thread each, and the
request signals' receivers (Django's own: query log reset, stale connection and cache closing, urlconf reset, none
of which has anything to do in the loop's thread) run inline too. Under Django's handler those were seven thread
hops per request; the ORM on the loop would raise ``SynchronousOnlyOperation``, so a middleware that needed the
database could not pass unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.core import signals
from django.core.exceptions import ImproperlyConfigured, MiddlewareNotUsed, RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpRequest, HttpResponseBadRequest, HttpResponseBase
from django.urls import set_script_prefix
from django.utils.deprecation import MiddlewareMixin
from django.utils.module_loading import import_string

from cesaflow.lib.hops import REQUEST_THREADS

GATEWAY_PATHS: Final = frozenset({"/api/v1/chat/completions", "/api/v1/models"})

# A subset of settings.MIDDLEWARE, in the same order (tests/test_gateway.py holds them to that).
GATEWAY_MIDDLEWARE: Final = (
    "django.middleware.security.SecurityMiddleware",
    "cesaflow.lib.middleware.SecurityHeadersMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    "cesaflow.lib.middleware.RequestContextMiddleware",
)

# Django's MiddlewareMixin classes of the chain whose hooks are pure header work (settings in, headers out: no I/O,
# no database, nothing that blocks), read for that: their hooks run on the event loop (``_OnTheLoop``). Any other
# MiddlewareMixin keeps Django's adaptation, a thread hop per hook.
ON_THE_LOOP: Final = frozenset(
    {
        "django.middleware.security.SecurityMiddleware",
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
        "csp.middleware.CSPMiddleware",
        # Django's full chain only (``PageASGIHandler``). The request's host and path, redirects to a slashed URL
        # (resolving the URLconf), the CSRF cookie read and set (``process_view``, which may parse a form body
        # already in memory, keeps Django's adaptation), flash messages kept in a cookie (``MESSAGE_STORAGE``).
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
    }
)


def is_gateway_path(path: str) -> bool:
    return path in GATEWAY_PATHS


class _OnTheLoop:
    """A ``MiddlewareMixin`` middleware of the gateway's chain, its hooks called on the event loop (Django's
    ``MiddlewareMixin.__acall__`` would send each hook to a thread)."""

    def __init__(self, middleware: MiddlewareMixin, get_response: Any) -> None:
        self.middleware = middleware
        self.get_response = get_response
        self.process_request = getattr(middleware, "process_request", None)
        self.process_response = getattr(middleware, "process_response", None)
        markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.process_request(request) if self.process_request is not None else None
        response = response or await self.get_response(request)
        if self.process_response is not None:
            response = self.process_response(request, response)
        return response  # type: ignore[no-any-return]


class PageASGIHandler(ASGIHandler):
    """Django's ASGI handler for every request but the gateway's: ``settings.MIDDLEWARE`` as Django loads it, except
    that the hooks of the ``ON_THE_LOOP`` middleware run on the event loop (``_OnTheLoop``), not in a thread hop
    each: under Django's ``MiddlewareMixin`` the full chain cost thirteen hops a request, most of them for header
    work (issue #13: the plain API's requests per second). The view and its view-level hooks (``process_view``
    and the rest) share one hop in the request's thread (``_get_response_async``), and ``request_started`` is sent
    on the loop (``handle``): a plain API request takes two hops (the view's, the response's closing) where
    Django's handler took six. The loading below is ``BaseHandler.load_middleware`` of Django 5.2 with those
    changes (re-read it and ``handle`` on a Django upgrade); the gateway's handler loads its own chain with it."""

    middleware_paths: tuple[str, ...] | None = None  # None: settings.MIDDLEWARE
    # The view and its view-level hooks in one thread hop (``_get_response_async``, below); the gateway's handler,
    # whose views are async, keeps Django's path on the loop.
    views_in_one_hop: bool = True

    async def _get_response_async(self, request: HttpRequest) -> HttpResponseBase:
        """The URL resolved, the ``process_view`` hooks, the view, ``process_exception`` and
        ``process_template_response`` hooks and the response's rendering, all in one thread hop: Django's sync
        ``_get_response``, as under WSGI. Django's async path sends each of those to the request's thread in a hop
        of its own (four a plain API request: CSRF's and the login check's ``process_view``, the view, DRF's
        rendering), though all of them are sync. An async view (``/metrics``) is run from that thread on the loop
        (``async_to_sync``), as Django does under WSGI."""
        if not self.views_in_one_hop:
            return await super()._get_response_async(request)  # type: ignore[misc,no-any-return]  # not in the stubs
        in_one_hop = sync_to_async(self._get_response, thread_sensitive=True)  # type: ignore[attr-defined]
        response: HttpResponseBase = await in_one_hop(request)
        return response

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """``ASGIHandler.__call__`` (Django 5.2), the request's thread lent from a pool rather than started for it
        (``cesaflow.lib.hops.RequestThreads``)."""
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        async with REQUEST_THREADS.request_thread():
            await self.handle(scope, receive, send)

    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        """``ASGIHandler.handle`` (Django 5.2) with ``request_started`` sent on the loop rather than in a thread hop.
        Its receivers are Django's own (the query log reset, stale connections closed) and have nothing to do in
        the loop's thread, where no database connection is ever opened (the ORM there raises
        ``SynchronousOnlyOperation``). An async receiver connected to it would fail every request at once
        (``send`` cannot run it inside a running loop), so it could not go unnoticed. The response is closed
        (``request_finished``) by ``close_response``."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        signals.request_started.send(sender=self.__class__, scope=scope)
        request, error_response = self.create_request(scope, body_file)
        if request is None:  # Django answers what it could not parse
            answer = error_response or HttpResponseBadRequest()
            body_file.close()
            await self.send_response(answer, send)
            await self.close_response(answer)
            return

        async def process_request() -> HttpResponseBase:
            response: HttpResponseBase = await self.run_get_response(request)
            with contextlib.suppress(asyncio.CancelledError):  # the client left while the response was being sent
                await self.send_response(response, send)
            return response

        # As Django does: a disconnect while the view works cancels it (a stream's generator is closed).
        listening = asyncio.create_task(self.listen_for_disconnect(receive))
        answering = asyncio.create_task(process_request())
        tasks: list[asyncio.Task[Any]] = [listening, answering]  # in this order, as Django checks them
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                # Read, not raised: a raised RequestAborted (the disconnect daphne and uvicorn report once the
                # answer is sent) would hold this frame in its traceback, and the frame the task holding it, leaving
                # the request, its response and the stream's generator to the cyclic collector.
                error = task.exception()
                if error is not None and not isinstance(error, RequestAborted):
                    if isinstance(error, AssertionError):
                        body_file.close()
                    raise error
            else:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            response = answering.result()
        except asyncio.CancelledError:
            await self.close_response(None)
        else:
            await self.close_response(response)
        body_file.close()

    async def close_response(self, response: HttpResponseBase | None) -> None:
        """Close the response, which sends ``request_finished`` (``None``: the view was cancelled, only the signal).
        In the request's thread, as Django does: its receivers close the database connection the view used, which
        lives there."""
        if response is None:
            await signals.request_finished.asend(sender=self.__class__)
        else:
            await sync_to_async(response.close)()

    def admit(self, path: str, instance: Any) -> None:
        """Refuse (``ImproperlyConfigured``) a middleware this chain cannot hold; any may join this one."""

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        get_response = self._get_response_async if is_async else self._get_response  # type: ignore[attr-defined]
        handler: Any = convert_exception_to_response(get_response)
        handler_is_async = is_async
        # View-level hooks run where the view does: in its thread hop (``_get_response_async``), or on the loop.
        hooks_async = is_async and not self.views_in_one_hop
        for path in reversed(self.middleware_paths if self.middleware_paths is not None else settings.MIDDLEWARE):
            middleware = import_string(path)
            if not getattr(middleware, "async_capable", False) or not getattr(middleware, "sync_capable", True):
                raise ImproperlyConfigured(f"{path} must be both sync- and async-capable.")
            middleware_is_async = handler_is_async
            adapted = self.adapt_method_mode(middleware_is_async, handler, handler_is_async, name=f"middleware {path}")
            try:
                instance = middleware(adapted)
            except MiddlewareNotUsed:
                continue
            handler = adapted
            self.admit(path, instance)
            if hasattr(instance, "process_view"):
                self._view_middleware.insert(0, self.adapt_method_mode(hooks_async, instance.process_view))
            if hasattr(instance, "process_template_response"):
                self._template_response_middleware.append(
                    self.adapt_method_mode(hooks_async, instance.process_template_response)
                )
            if hasattr(instance, "process_exception"):
                # Django keeps the exception-handling stack synchronous.
                self._exception_middleware.append(self.adapt_method_mode(False, instance.process_exception))
            chained = _OnTheLoop(instance, handler) if middleware_is_async and path in ON_THE_LOOP else instance
            handler = convert_exception_to_response(chained)
            handler_is_async = middleware_is_async
        self._middleware_chain = self.adapt_method_mode(is_async, handler, handler_is_async)


class GatewayASGIHandler(PageASGIHandler):
    """Django's ASGI handler with ``GATEWAY_MIDDLEWARE`` instead of ``settings.MIDDLEWARE``, and without a
    per-request ``ThreadSensitiveContext``.

    Django runs each request inside one so that all of its sync code shares one thread, created for that request:
    a thread start per request. The gateway's views need no such affinity: their database work is whole thread
    hops (``sync_to_async(thread_sensitive=False)``, each in its own transaction, handing its connection back at
    the end), so they use the event loop's reusable pool, and the request signals are sent on the loop
    (``close_response``).
    """

    middleware_paths: tuple[str, ...] | None = GATEWAY_MIDDLEWARE
    views_in_one_hop = False  # its views are async: Django's path, on the loop

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"The gateway serves HTTP only, not {scope['type']}.")
        await self.handle(scope, receive, send)

    async def close_response(self, response: HttpResponseBase | None) -> None:
        """On the loop: the gateway's views hand their connections back within their own hops, so
        ``request_finished``'s receivers (Django's own, sync, without I/O) have nothing to close here."""
        if response is None:
            signals.request_finished.send(sender=self.__class__)
        else:
            response.close()  # sends request_finished

    def admit(self, path: str, instance: Any) -> None:
        if not iscoroutinefunction(instance):
            raise ImproperlyConfigured(f"{path} did not adapt to the async chain.")
        # View-level hooks would need Django's full adaptation; the gateway's middleware has none.
        for hook in ("process_view", "process_template_response", "process_exception"):
            if hasattr(instance, hook):
                raise ImproperlyConfigured(f"{path} has {hook}: keep such middleware off the gateway's path.")
