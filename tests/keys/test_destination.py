"""A provider key is bound to where it is sent (issue #14 point 4): the normalized ``base_url`` is part of the AAD, so
a destination changed in the database (no keyring needed) makes the key unusable, audited ``key.decrypt_failed``, and
nothing reaches any provider. Spellings of the same destination are the same destination.
"""

from __future__ import annotations

import asyncio

import pytest
from django.db import connection
from django.urls import reverse

from cesaflow.lib.http import close_http_clients, get_http_client
from keys.checking import provider_key_check
from keys.egress import egress_policy
from keys.models import Provider, ProviderKey
from keys.providers import PROVIDERS, ProviderName, provider_destination
from keys.services import ProviderKeyDecryptionError, provider_key_create, provider_key_open
from keys.urlguard import normalize_base_url
from runs.models import AuditEvent
from runs.providers import ChatRequest, Message, adapter_for
from tests.keys.conftest import fake_secret

# Every test starts with the simulator (``sim``, one per module) empty: its queues and its request log.
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("sim_clean")]


def _set_base_url(key: ProviderKey, base_url: str) -> None:
    """What someone with write access to the database alone can do: no keyring, no application."""
    with connection.cursor() as cursor:
        cursor.execute("UPDATE keys_providerkey SET base_url = %s WHERE id = %s", [base_url, key.pk])


def _fresh(key: ProviderKey) -> ProviderKey:
    return ProviderKey.objects.get(pk=key.pk)


def _complete(key: ProviderKey) -> None:
    """One completion the way the gateway and the executors make it: open the key, then stream from
    ``key.base_url`` with it."""
    with provider_key_open(key=key, purpose="completion", reference="r-1") as secret:
        asyncio.run(_stream(key, secret.reveal()))


async def _stream(key: ProviderKey, api_key: str) -> None:
    try:
        adapter = adapter_for(
            key.provider, base_url=key.base_url or None, api_key=api_key, client=get_http_client(egress_policy())
        )
        request = ChatRequest(model="fake/echo", messages=[Message(role="user", content="hello")], max_tokens=16)
        async for _event in adapter.stream_chat(request):
            pass
    finally:
        await close_http_clients()


def _decrypt_failures(key: ProviderKey, purpose: str) -> int:
    events = AuditEvent.objects.filter(event=AuditEvent.KEY_DECRYPT_FAILED, target_id=str(key.pk))
    return sum(1 for event in events if event.metadata["purpose"] == purpose)


@pytest.fixture
def sim_key(cast, ring1, sim) -> ProviderKey:
    return provider_key_create(
        org=cast.org_a,
        actor=cast.admin_a.user,
        provider=Provider.OPENAI,
        label="sim",
        secret=fake_secret(),
        base_url=sim.base_urls["openai"],
    )


# --- A destination changed in SQL -----------------------------------------------------------------------------------
# The "attacker's host" is another path of the simulator: were the key opened, the request would land there and be
# recorded, so "the simulator saw nothing" means no request left at all.


def test_a_base_url_changed_in_sql_stops_a_completion_before_any_request(cast, sim, sim_key):
    _complete(sim_key)  # the untouched key works and its call is seen: the counting below means something
    assert len(sim.state.requests()) == 1
    sim.state.reset()

    _set_base_url(sim_key, sim.base_urls["groq"])
    with pytest.raises(ProviderKeyDecryptionError):
        _complete(_fresh(sim_key))

    assert sim.state.requests() == []
    assert _decrypt_failures(sim_key, "completion") == 1
    assert AuditEvent.objects.filter(event=AuditEvent.KEY_USED, target_id=str(sim_key.pk)).count() == 1  # the first


def test_a_base_url_changed_in_sql_stops_a_key_check_before_any_request(cast, sim, sim_key):
    _set_base_url(sim_key, sim.base_urls["groq"])

    with pytest.raises(ProviderKeyDecryptionError):
        provider_key_check(key=_fresh(sim_key), actor=cast.admin_a.user)
    # The same through the API: the generic "could not be decrypted", never a call.
    response = cast.admin_a.api().post(reverse("keys_api:provider-key-check", kwargs={"key_id": sim_key.pk}))
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "key_unreadable"

    assert sim.state.requests() == []
    assert _decrypt_failures(sim_key, "check") == 2
    assert not AuditEvent.objects.filter(event__in=[AuditEvent.KEY_USED, AuditEvent.KEY_CHECKED]).exists()


def test_a_caller_whose_copy_names_another_destination_gets_nothing(cast, sim, sim_key):
    """The row is intact, but the object the caller will send the key with says otherwise (a stale copy, or one
    altered after it was read): the secret stays shut, as the caller would send it to the wrong place."""
    stale = _fresh(sim_key)
    stale.base_url = sim.base_urls["groq"]

    with pytest.raises(ProviderKeyDecryptionError):
        _complete(stale)

    assert sim.state.requests() == []
    assert _decrypt_failures(sim_key, "completion") == 1
    _complete(_fresh(sim_key))  # the row itself still works
    assert len(sim.state.requests()) == 1


def test_a_tampered_row_stays_shut_for_a_caller_holding_the_old_copy(cast, sim, sim_key):
    _set_base_url(sim_key, sim.base_urls["groq"])
    with pytest.raises(ProviderKeyDecryptionError):
        _complete(sim_key)  # read before the UPDATE: it would call the right place, but the row is not trusted
    assert sim.state.requests() == []


# --- Normalization: one destination, however it is spelled -----------------------------------------------------


@pytest.fixture
def local_key(cast, ring1) -> tuple[ProviderKey, str]:
    secret = fake_secret()
    key = provider_key_create(
        org=cast.org_a,
        actor=cast.admin_a.user,
        provider=Provider.OPENAI,
        label="local",
        secret=secret,
        base_url="https://localhost/v1",
    )
    return key, secret


def _opens(key: ProviderKey) -> str | None:
    try:
        with provider_key_open(key=_fresh(key), purpose="test") as secret:
            return secret.reveal()
    except ProviderKeyDecryptionError:
        return None


@pytest.mark.parametrize(
    "spelling",
    [
        "https://localhost/v1/",  # trailing slash
        "https://localhost/v1///",
        "https://LocalHost/v1",  # case of the host
        "HTTPS://localhost/v1",  # case of the scheme
        "https://localhost:443/v1",  # the default port, spelled out
        "https://localhost./v1",  # the root label's dot
        "  https://localhost/v1  ",
    ],
)
def test_equivalent_spellings_of_the_destination_open_and_nothing_else_does(local_key, spelling):
    key, secret = local_key
    assert key.base_url == "https://localhost/v1"
    _set_base_url(key, spelling)
    assert _opens(key) == secret
    # The same spelling of another path: it is the destination that opens the key, not a lax comparison.
    _set_base_url(key, spelling.replace("/v1", "/v2"))
    assert _opens(key) is None


@pytest.mark.parametrize(
    "other",
    [
        "http://localhost/v1",  # scheme
        "https://127.0.0.1/v1",  # host (even one that resolves to the same address)
        "https://localhost.attacker.example/v1",
        "https://localhost:8443/v1",  # port
        "https://localhost:80/v1",
        "https://localhost/v2",  # path
        "https://localhost/V1",  # paths are case-sensitive
        "https://localhost/v1/proxy",
        "https://localhost",
        "https://attacker.example@localhost/v1",  # not a usable URL at all
        "https://localhost/v1?next=https://attacker.example",
        "",  # the provider's default endpoint
    ],
)
def test_another_destination_does_not_open_and_is_audited(local_key, other):
    key, _secret = local_key
    _set_base_url(key, other)
    assert _opens(key) is None
    assert _decrypt_failures(key, "test") == 1


def test_the_empty_base_url_is_the_providers_default_endpoint(cast, ring1):
    secret = fake_secret()
    key = provider_key_create(org=cast.org_a, actor=None, provider=Provider.OPENAI, label="official", secret=secret)
    default = PROVIDERS[ProviderName.OPENAI].default_base_url
    assert key.base_url == ""
    assert default is not None

    scheme, rest = default.split("://", 1)
    _set_base_url(key, f"{scheme.upper()}://{rest}/")  # the default, spelled differently
    assert _opens(key) == secret
    _set_base_url(key, "")
    assert _opens(key) == secret
    _set_base_url(key, PROVIDERS[ProviderName.GROQ].default_base_url or "")  # another provider's endpoint
    assert _opens(key) is None


def test_normalization_is_one_function_for_storing_and_binding():
    assert normalize_base_url("HTTPS://API.Example.COM:443/openai/v1/") == "https://api.example.com/openai/v1"
    assert normalize_base_url("http://[0:0:0:0:0:0:0:1]:80/v1") == "http://[::1]/v1"
    assert normalize_base_url("https://api.example.com:8443/v1") == "https://api.example.com:8443/v1"
    default = PROVIDERS[ProviderName.ANTHROPIC].default_base_url or ""
    assert provider_destination("anthropic", "") == normalize_base_url(default)
    assert provider_destination("anthropic", default + "/") == provider_destination("anthropic", None)
    # Nothing unusable can come out equal to a usable destination.
    unusable = provider_destination("openai_compatible", "https://user@api.example.com/v1")
    assert unusable != provider_destination("openai_compatible", "https://api.example.com/v1")
    assert not unusable.startswith(("http://", "https://"))
