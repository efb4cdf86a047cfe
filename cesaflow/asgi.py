"""ASGI entry point: HTTP through Django, websockets through Channels (Origin checked; the consumers authenticate
through ``orgs.authentication``, the same path as every HTTP request)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cesaflow.settings")

from django.core.asgi import get_asgi_application

# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from cesaflow.routing import websocket_urlpatterns  # noqa: E402
from runs.executor import asgi_wrapper  # noqa: E402

# asgi_wrapper binds the inline run executor to the server's event loop and answers the lifespan protocol.
application = asgi_wrapper(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
        }
    )
)
