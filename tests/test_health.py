import asyncio

import pytest
from channels.layers import get_channel_layer

from cesaflow.views import _probe_channel_layer
from tests.runs.test_execution_support import async_isolation  # noqa: F401 - a fixture, used below

pytestmark = pytest.mark.django_db


def test_healthz_answers_without_auth(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_checks_database_cache_and_channel_layer(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "cache": "ok", "channel_layer": "ok"}


def test_readyz_reports_503_when_cache_is_down(client, settings):
    settings.CACHES = {
        **settings.CACHES,
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            # Nothing listens on port 1: the cache is unreachable.
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.2, "SOCKET_TIMEOUT": 0.2},
        },
    }
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["cache"] == "unavailable"
    assert response.json()["checks"]["database"] == "ok"


@pytest.mark.usefixtures("async_isolation")
async def test_the_channel_layer_probe_answers_while_a_receiver_waits_in_redis():
    """A process with an open websocket or an inline executor has a receiver blocked in Redis's pop, holding the
    receive lock: the probe's message must still come back (it timed out there: /readyz answered 503)."""
    layer = get_channel_layer()
    channel = await layer.new_channel()
    waiting = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0.2)  # in the pop now
    try:
        await _probe_channel_layer()
    finally:
        waiting.cancel()
