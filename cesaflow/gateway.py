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

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core import signals
from django.core.exceptions import ImproperlyConfigured, MiddlewareNotUsed, RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpRequest, HttpResponseBadRequest, HttpResponseBase
from django.urls import set_script_prefix
from django.utils.deprecation import MiddlewareMixin
from django.utils.module_loading import import_string

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
    work (issue #13: the plain API's requests per second). View-level hooks (``process_view`` and the rest) keep
    Django's adaptation. The loading below is ``BaseHandler.load_middleware`` of Django 5.2 with that one change
    (re-read it on a Django upgrade); the gateway's handler loads its own chain with it."""

    middleware_paths: tuple[str, ...] | None = None  # None: settings.MIDDLEWARE

    def admit(self, path: str, instance: Any) -> None:
        """Refuse (``ImproperlyConfigured``) a middleware this chain cannot hold; any may join this one."""

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        get_response = self._get_response_async if is_async else self._get_response  # type: ignore[attr-defined]
        handler: Any = convert_exception_to_response(get_response)
        handler_is_async = is_async
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
                self._view_middleware.insert(0, self.adapt_method_mode(is_async, instance.process_view))
            if hasattr(instance, "process_template_response"):
                self._template_response_middleware.append(
                    self.adapt_method_mode(is_async, instance.process_template_response)
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
    the end), so they use the event loop's reusable pool; Django's own small sync steps (the request signals'
    receivers) run on asgiref's shared thread.
    """

    middleware_paths: tuple[str, ...] | None = GATEWAY_MIDDLEWARE

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"The gateway serves HTTP only, not {scope['type']}.")
        await self.handle(scope, receive, send)

    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        """``ASGIHandler.handle`` (Django 5.2) with the request signals sent and the response closed on the loop.
        Their receivers are Django's own, sync and without I/O; an async receiver connected to ``request_started``
        or ``request_finished`` would fail every gateway request at once (``send`` cannot run it inside a running
        loop), so it could not go unnoticed either."""
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
            answer.close()
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
                try:
                    task.result()
                except RequestAborted:
                    pass
                except AssertionError:
                    body_file.close()
                    raise
            else:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            response = answering.result()
        except asyncio.CancelledError:
            signals.request_finished.send(sender=self.__class__)
        else:
            response.close()  # sends request_finished
        body_file.close()

    def admit(self, path: str, instance: Any) -> None:
        if not iscoroutinefunction(instance):
            raise ImproperlyConfigured(f"{path} did not adapt to the async chain.")
        # View-level hooks would need Django's full adaptation; the gateway's middleware has none.
        for hook in ("process_view", "process_template_response", "process_exception"):
            if hasattr(instance, hook):
                raise ImproperlyConfigured(f"{path} has {hook}: keep such middleware off the gateway's path.")
