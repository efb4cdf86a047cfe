"""Error pages render for anonymous and signed-in people, through the ASGI handler (where a lazy session once made
every signed-in 404 a 500), with DEBUG on (the embedded default of ``make run``) and off (production)."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from django.urls import reverse

from orgs import login_guard
from tests.runs.test_execution_support import async_isolation  # noqa: F401 - a fixture, used below
from tests.signin import sign_in

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("async_isolation")]

PERSONS = ["anonymous", "signed-in"]


@pytest.fixture(params=[True, False], ids=["debug", "production"])
def debug(request, settings):
    settings.DEBUG = request.param
    return request.param


async def client_for(person: str, cast, *, csrf: bool = False) -> AsyncClient:
    client = AsyncClient(enforce_csrf_checks=csrf)
    if person == "signed-in":
        await sync_to_async(sign_in)(client, cast.dev_a.user)
    return client


def assert_page(response, status: int) -> None:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"].startswith("text/html")
    assert response.content.strip(), "an error page, not an empty body"


@pytest.mark.parametrize("person", PERSONS)
@pytest.mark.parametrize("path", ["/admin/", "/no-such-page/", "/runs/00000000-0000-0000-0000-000000000000/"])
async def test_404(cast, debug, person, path):
    response = await (await client_for(person, cast)).get(path)
    if person == "anonymous" and path.startswith("/runs/"):
        assert response.status_code == 302  # the sign-in page first: nothing about a run is said to strangers
        return
    assert_page(response, 404)


@pytest.mark.parametrize("person", PERSONS)
async def test_400_for_a_host_we_do_not_serve(cast, debug, person):
    response = await (await client_for(person, cast)).get("/", headers={"host": "evil.example"})
    assert_page(response, 400)


async def test_403_for_a_page_the_role_does_not_allow(cast, debug):
    response = await (await client_for("signed-in", cast)).get(reverse("orgs:settings"))
    assert_page(response, 403)


@pytest.mark.parametrize("person", PERSONS)
async def test_405_for_a_method_the_page_does_not_take(cast, debug, person):
    response = await (await client_for(person, cast)).get(reverse("orgs:logout"))
    if person == "anonymous":
        assert response.status_code == 302
        return
    assert_page(response, 405)
    assert response["Allow"] == "POST"


@pytest.mark.parametrize("person", PERSONS)
async def test_csrf_failure(cast, debug, person):
    client = await client_for(person, cast, csrf=True)
    target = reverse("orgs:login") if person == "anonymous" else reverse("orgs:org_create")
    response = await client.post(target, {"name": "x", "email": "a@b.example", "password": "x"})
    assert_page(response, 403)


async def test_429_for_a_locked_sign_in(cast, debug, settings):
    settings.LOGIN_FAILURE_LIMIT_ACCOUNT = 1
    client = await client_for("anonymous", cast)
    for _ in range(2):
        response = await client.post(reverse("orgs:login"), {"email": "dave@a.example", "password": "wrong"})
    assert_page(response, 429)
    assert response["Retry-After"]
    await sync_to_async(login_guard.login_success_record)(email="dave@a.example")
