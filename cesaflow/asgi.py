"""ASGI entry point: HTTP through Django, websockets through Channels (Origin checked; the consumers authenticate
through ``orgs.authentication``, the same path as every HTTP request). The OpenAI-compatible endpoint takes the
gateway's lean path (``cesaflow.gateway``): the same Django views with only the middleware they need; every other
request Django's full chain, its header middleware called on the event loop (``PageASGIHandler``).

Every HTTP request passes the request-body limit table first (``cesaflow.lib.body_limit``): this is the limit's
enforcement point under any ASGI server; ``cesaflow.serve``, the production server, enforces the same table before
the body reaches the application, and answers with the same ``too_large_answer``."""

import os
from importlib import import_module
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cesaflow.settings")

import django

# Django must be set up before anything imports models.
django.setup(set_prefix=False)

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from cesaflow.gateway import GatewayASGIHandler, PageASGIHandler, is_gateway_path  # noqa: E402
from cesaflow.lib.api import error_body  # noqa: E402
from cesaflow.lib.body_limit import BodyLimitMiddleware, TooLarge, too_large_message  # noqa: E402
from cesaflow.lib.heap import freeze_startup_objects  # noqa: E402
from cesaflow.routing import websocket_urlpatterns  # noqa: E402
from runs.executor import asgi_wrapper  # noqa: E402
from runs.proxy.errors import ProxyError  # noqa: E402

gateway_asgi_app = GatewayASGIHandler()
django_asgi_app = PageASGIHandler()


def too_large_answer(path: str, limit: int) -> TooLarge:
    """The 413 for a body over ``limit`` on ``path``, in the shape its clients read: OpenAI's on the gateway (SDKs
    parse it), the one API error shape under ``/api/`` and for webhooks (GitHub shows it in the hook's recent
    deliveries), a short page everywhere else."""
    message = too_large_message(limit)
    if is_gateway_path(path):
        return TooLarge.json(ProxyError(413, message, code="request_too_large").body())
    if path.startswith(("/api/", "/hooks/")):
        return TooLarge.json(error_body("request_too_large", message))
    return TooLarge.page(message)


async def http_app(scope: Any, receive: Any, send: Any) -> None:
    """The gateway's two paths take the lean handler; every other request Django's full one."""
    app = gateway_asgi_app if is_gateway_path(scope.get("path", "")) else django_asgi_app
    await app(scope, receive, send)


# asgi_wrapper binds the inline run executor to the server's event loop and answers the lifespan protocol.
application = asgi_wrapper(
    ProtocolTypeRouter(
        {
            "http": BodyLimitMiddleware(http_app, answer=too_large_answer),
            "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
        }
    )
)

# The URL patterns and the views behind them are loaded now rather than by the first request, so that they are
# frozen with the rest of what the process starts with (``cesaflow.lib.heap``).
import_module(settings.ROOT_URLCONF)
freeze_startup_objects()
