"""Websocket routes (``/ws/...``). Consumers authenticate and check the org in ``connect``."""

from typing import Any

websocket_urlpatterns: list[Any] = []
