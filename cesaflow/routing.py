"""Websocket routes (``/ws/...``). Consumers authenticate and check the org in ``connect``."""

from typing import Any

from django.urls import path

from runs.consumers import OrgRunsConsumer, RunConsumer

websocket_urlpatterns: list[Any] = [
    path("ws/runs/<uuid:run_id>/", RunConsumer.as_asgi()),
    path("ws/org/runs/", OrgRunsConsumer.as_asgi()),
]
