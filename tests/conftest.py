"""Shared fixtures: the fixed cast (STYLE.md rule 17) and clients for each of its members.

Two organizations, each with an Admin and a Developer, plus an outsider who belongs to neither.
Tests run against real PostgreSQL and Redis (``make test`` points DATABASE_URL / REDIS_URL at them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
from django.core.cache import caches
from django.db import connection
from django.test import Client
from rest_framework.test import APIClient

from cesaflow.lib import shutdown
from orgs.models import ApiKey, Organization, Role, User
from orgs.permissions import ADMIN_CAPABILITIES, DEFAULT_API_KEY_SCOPES
from orgs.services import api_key_create, organization_create
from tests.signin import sign_in

PASSWORD = "correct horse battery staple 42"


@pytest.fixture(autouse=True)
def _fast_hasher_and_clean_cache(settings, request):
    """bcrypt at cost 12 is slow on purpose; tests that check hashing opt out with @pytest.mark.real_hasher."""
    if "real_hasher" not in request.keywords:
        settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    for alias in ("default", "sessions"):
        caches[alias].clear()


@pytest.fixture(autouse=True)
def _serving_process():
    """A test that shuts the in-process server down (an ASGI lifespan shutdown) leaves this process "shutting down"
    (``/readyz`` 503, new streams closed at once), which is right for a server and wrong for the next test."""
    yield
    shutdown.reset()


@pytest.fixture(autouse=True, scope="session")
def official_provider_specs():
    """Tests never reach a real provider: a key without a base_url (the official API) points at a closed loopback
    port instead, so a call fails fast as unreachable rather than leaving the machine."""
    from dataclasses import replace

    from keys import providers

    original = dict(providers.PROVIDERS)
    for name, spec in original.items():
        if spec.default_base_url is not None:
            path = urlsplit(spec.default_base_url).path
            providers.PROVIDERS[name] = replace(spec, default_base_url=f"http://127.0.0.1:9{path}")
    yield original
    providers.PROVIDERS.update(original)


@pytest.fixture(autouse=True, scope="session")
def _require_real_services(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        if connection.vendor != "postgresql":
            pytest.exit("Tests need PostgreSQL: run `make test` (or set DATABASE_URL).", returncode=2)
    from django.conf import settings

    if not settings.REDIS_URL:
        pytest.exit("Tests need Redis: run `make test` (or set REDIS_URL).", returncode=2)


@dataclass
class Member:
    user: User
    org: Organization | None
    api_key: ApiKey | None = None
    api_secret: str = ""

    def client(self) -> Client:
        c = Client()
        sign_in(c, self.user)
        return c

    def api(self) -> APIClient:
        """An API client authenticated with this member's org API key (x-api-key)."""
        c = APIClient()
        if self.api_secret:
            c.credentials(HTTP_X_API_KEY=self.api_secret)
        return c

    def session_api(self) -> APIClient:
        c = APIClient()
        sign_in(c, self.user)
        return c


@dataclass
class Cast:
    org_a: Organization
    org_b: Organization
    admin_a: Member
    dev_a: Member
    admin_b: Member
    dev_b: Member
    outsider: Member


def _member(email: str, org: Organization | None, role: str | None) -> Member:
    user = User.objects.create_user(email=email, password=PASSWORD, name=email.split("@")[0].title())
    member = Member(user=user, org=org)
    if org is not None and role is not None:
        org.memberships.create(user=user, role=role)
        scopes = sorted(ADMIN_CAPABILITIES if role == Role.ADMIN else DEFAULT_API_KEY_SCOPES)
        member.api_key, member.api_secret = api_key_create(org=org, name=f"{email} key", actor=user, scopes=scopes)
    return member


@pytest.fixture
def cast(db) -> Cast:
    alice = User.objects.create_user(email="alice@a.example", password=PASSWORD, name="Alice")
    bob = User.objects.create_user(email="bob@b.example", password=PASSWORD, name="Bob")
    org_a = organization_create(name="Org A", admin=alice, slug="org-a")
    org_b = organization_create(name="Org B", admin=bob, slug="org-b")
    admin_a = Member(user=alice, org=org_a)
    admin_a.api_key, admin_a.api_secret = api_key_create(
        org=org_a, name="alice key", actor=alice, scopes=sorted(ADMIN_CAPABILITIES)
    )
    admin_b = Member(user=bob, org=org_b)
    admin_b.api_key, admin_b.api_secret = api_key_create(
        org=org_b, name="bob key", actor=bob, scopes=sorted(ADMIN_CAPABILITIES)
    )
    return Cast(
        org_a=org_a,
        org_b=org_b,
        admin_a=admin_a,
        dev_a=_member("dave@a.example", org_a, Role.DEVELOPER),
        admin_b=admin_b,
        dev_b=_member("erin@b.example", org_b, Role.DEVELOPER),
        outsider=_member("oscar@nowhere.example", None, None),
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Before any fixture is torn down (the database flush first of all): let the proxy's run endings, which a live
    server records just after its answer (``runs.api.proxy_call``), finish writing. Bounded."""
    from runs.api import proxy_call

    deadline = time.monotonic() + 10
    while proxy_call._background and time.monotonic() < deadline:
        time.sleep(0.01)
    yield
