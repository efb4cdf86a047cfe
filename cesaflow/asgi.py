"""ASGI entry point: HTTP through Django, websockets through Channels (Origin checked; the consumers authenticate
through ``orgs.authentication``, the same path as every HTTP request). The OpenAI-compatible endpoint takes the
gateway's lean path (``cesaflow.gateway``): the same Django views with only the middleware they need."""

import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cesaflow.settings")

from django.core.asgi import get_asgi_application

# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from cesaflow.gateway import GatewayASGIHandler, is_gateway_path  # noqa: E402
from cesaflow.routing import websocket_urlpatterns  # noqa: E402
from runs.executor import asgi_wrapper  # noqa: E402

gateway_asgi_app = GatewayASGIHandler()


async def http_app(scope: Any, receive: Any, send: Any) -> None:
    """The gateway's two paths take the lean handler; every other request Django's full one."""
    app = gateway_asgi_app if is_gateway_path(scope.get("path", "")) else django_asgi_app
    await app(scope, receive, send)


# asgi_wrapper binds the inline run executor to the server's event loop and answers the lifespan protocol.
application = asgi_wrapper(
    ProtocolTypeRouter(
        {
            "http": http_app,
            "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
        }
    )
)
