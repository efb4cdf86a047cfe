"""The gateway's lean request path: the OpenAI-compatible endpoint (``/api/v1/chat/completions``,
``/api/v1/models``) is what IDEs and SDKs call on every keystroke-sized request, so it skips what it never uses.

These views authenticate with org API keys only (``orgs.authentication``, through ``runs.api.proxy_views``), are
CSRF-exempt and render nothing: no session, CSRF, login redirect, messages or template middleware applies to
them. They keep what every response needs: the security headers, the request context (request id, client IP,
user agent for the audit trail) and the CSP header. ``cesaflow.asgi`` routes exactly these paths here; everything
else takes Django's full handler. Every middleware here is async-capable, so the chain runs on the event loop
without a thread hop before the view.
"""

from __future__ import annotations

from typing import Any, Final

from asgiref.sync import iscoroutinefunction
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
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


def is_gateway_path(path: str) -> bool:
    return path in GATEWAY_PATHS


class GatewayASGIHandler(ASGIHandler):
    """Django's ASGI handler with ``GATEWAY_MIDDLEWARE`` instead of ``settings.MIDDLEWARE``, and without a
    per-request ``ThreadSensitiveContext``.

    Django runs each request inside one so that all of its sync code shares one thread, created for that request:
    a thread start per request. The gateway's views need no such affinity: their database work is whole thread
    hops (``sync_to_async(thread_sensitive=False)``, each in its own transaction, handing its connection back at
    the end), so they use the event loop's reusable pool; Django's own small sync steps (the request signals'
    receivers) run on asgiref's shared thread.
    """

    middleware_paths: tuple[str, ...] = GATEWAY_MIDDLEWARE

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"The gateway serves HTTP only, not {scope['type']}.")
        await self.handle(scope, receive, send)

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        handler: Any = convert_exception_to_response(self._get_response_async)  # type: ignore[attr-defined]
        for path in reversed(self.middleware_paths):
            middleware = import_string(path)
            if not getattr(middleware, "async_capable", False):
                raise ImproperlyConfigured(f"{path} is not async-capable: it cannot be on the gateway's path.")
            instance = middleware(handler)
            if not iscoroutinefunction(instance):
                raise ImproperlyConfigured(f"{path} did not adapt to the async chain.")
            # View-level hooks would need Django's full adaptation; the gateway's middleware has none.
            for hook in ("process_view", "process_template_response", "process_exception"):
                if hasattr(instance, hook):
                    raise ImproperlyConfigured(f"{path} has {hook}: keep such middleware off the gateway's path.")
            handler = convert_exception_to_response(instance)
        self._middleware_chain = handler
