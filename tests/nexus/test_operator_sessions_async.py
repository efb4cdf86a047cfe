"""The ASGI path of the Nexus middleware (production runs under daphne): same operator, same separation."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import AsyncClient

from nexus.sessions import SessionStoreUnavailable
from tests.nexus.conftest import make_operator, nexus_sign_in, nexus_url
from tests.runs.test_execution_support import async_isolation  # noqa: F401 - a fixture, used below
from tests.signin import sign_in

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("async_isolation")]


async def test_asgi_requests_see_the_operator_on_nexus_and_the_user_on_the_dashboard(cast):
    enrolled = await sync_to_async(make_operator)()
    client = AsyncClient()
    await sync_to_async(sign_in)(client, cast.admin_a.user)
    await sync_to_async(nexus_sign_in)(client, enrolled.operator)
    home = await client.get(nexus_url())
    assert home.status_code == 200
    assert home.asgi_request.user == enrolled.operator  # type: ignore[comparison-overlap]  # Nexus sets an Operator
    assert "no-store" in home["Cache-Control"]
    api = await client.get("/api/v1/runs")
    assert api.status_code == 200
    assert api.asgi_request.user == cast.admin_a.user


async def test_asgi_anonymous_nexus_request_goes_to_the_sign_in_page():
    response = await AsyncClient().get(nexus_url())
    assert response.status_code == 302
    assert response["Location"].startswith(nexus_url("login/"))


async def test_asgi_store_down_is_503(monkeypatch):
    def down(*args, **kwargs):
        raise SessionStoreUnavailable("ConnectionError")

    monkeypatch.setattr("nexus.middleware.operator_session_authenticate", down)
    client = AsyncClient()
    client.cookies[settings.NEXUS_COOKIE_NAME] = "anything"
    assert (await client.get(nexus_url())).status_code == 503
