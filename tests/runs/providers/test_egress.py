"""The SSRF guard of the shared HTTP client (cesaflow.lib.http): refusals happen at connect time, after DNS."""

from __future__ import annotations

import ipaddress

import httpx
import pytest

from cesaflow.lib.http import (
    EgressDenied,
    EgressPolicy,
    check_url,
    close_http_clients,
    get_http_client,
    is_forbidden_address,
)
from keys.urlguard import NOT_ALLOWED_MESSAGE
from runs.providers.errors import classify_transport_error
from runs.providers.events import ErrorKind
from runs.providers.openai import OpenAIAdapter
from tests.runs.conftest import FAKE_KEY
from tests.runs.providers.conftest import FAST, chat, run

PRODUCTION = EgressPolicy.build(allow_private=False)


@pytest.fixture
async def production_client():
    yield get_http_client(PRODUCTION)
    await close_http_clients()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/",
        "http://[::1]:8000/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/v1",
        "http://192.168.0.10/",
        "http://100.100.100.200/",  # Alibaba metadata, CGNAT range
        "http://[::ffff:127.0.0.1]/",  # IPv4-mapped loopback
        "http://[fd00:ec2::254]/",  # AWS IPv6 metadata
        "http://0.0.0.0:8000/",
    ],
)
async def test_production_policy_refuses_internal_addresses(url, production_client):
    with pytest.raises(EgressDenied, match="not allowed"):
        await production_client.get(url)


async def test_a_name_resolving_to_loopback_is_refused_at_connect_time(production_client, simulator):
    # "localhost" is not an IP literal, so only the connect-time check (after resolution) can catch it.
    url = f"http://localhost:{simulator.port}/_fake/health"
    check_url(url, PRODUCTION)  # the text of the URL looks harmless
    with pytest.raises(EgressDenied, match="resolves to a private or reserved address"):
        await production_client.get(url)
    assert simulator.requests() == []


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/", "http://user:pw@example.com/"])
def test_non_http_urls_and_credentials_are_refused(url):
    with pytest.raises(EgressDenied):
        check_url(url, EgressPolicy.build(allow_private=True))


@pytest.mark.parametrize("entry", ["localhost", "LOCALHOST", "127.0.0.0/8"])
async def test_allowlisted_host_is_allowed_in_production(entry, simulator):
    policy = EgressPolicy.build(allow_private=False, allowlist={entry})
    response = await get_http_client(policy).get(f"http://localhost:{simulator.port}/_fake/health")
    await close_http_clients()
    assert response.status_code == 200


async def test_allowlisted_host_and_port_does_not_open_other_ports(simulator):
    policy = EgressPolicy.build(allow_private=False, allowlist={f"127.0.0.1:{simulator.port}"})
    client = get_http_client(policy)
    try:
        assert (await client.get(f"http://127.0.0.1:{simulator.port}/_fake/health")).status_code == 200
        with pytest.raises(EgressDenied):
            await client.get("http://127.0.0.1:6379/")
    finally:
        await close_http_clients()


async def test_development_policy_allows_loopback(simulator):
    client = get_http_client(EgressPolicy.build(allow_private=True))
    try:
        response = await client.get(f"http://localhost:{simulator.port}/_fake/health")
    finally:
        await close_http_clients()
    assert response.json()["status"] == "ok"


async def test_adapter_reports_a_refused_destination_as_blocked_without_retrying(production_client, simulator):
    adapter = OpenAIAdapter(
        base_url=simulator.base_urls["openai"], api_key=FAKE_KEY, client=production_client, limits=FAST
    )
    outcome = await run(adapter, chat())

    assert outcome.error.kind is ErrorKind.BLOCKED
    assert outcome.retries == []
    assert simulator.requests() == []


def test_redirects_are_never_followed_and_the_environment_is_ignored():
    import asyncio

    async def build() -> httpx.AsyncClient:
        client = get_http_client(PRODUCTION)
        await close_http_clients()
        return client

    client = asyncio.run(build())
    assert client.follow_redirects is False
    assert client.trust_env is False


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [
        ("8.8.8.8", False),
        ("2606:4700:4700::1111", False),
        ("127.0.0.2", True),
        ("172.16.5.4", True),
        ("fe80::1", True),
        ("64:ff9b::7f00:1", True),  # NAT64 form of 127.0.0.1
        ("2002:7f00:1::", True),  # 6to4 form of 127.0.0.1
        ("224.0.0.1", True),
    ],
)
def test_forbidden_address_classification(address, forbidden):
    assert is_forbidden_address(ipaddress.ip_address(address)) is forbidden


def test_one_client_per_event_loop_and_policy():
    import asyncio

    async def same_loop() -> tuple[httpx.AsyncClient, httpx.AsyncClient, httpx.AsyncClient]:
        a = get_http_client(PRODUCTION)
        b = get_http_client(EgressPolicy.build(allow_private=False))
        c = get_http_client(EgressPolicy.build(allow_private=True))
        await close_http_clients()
        return a, b, c

    a, b, c = asyncio.run(same_loop())
    assert a is b
    assert a is not c
    d, _, _ = asyncio.run(same_loop())
    assert d is not a  # another loop gets its own client (httpx connections are bound to a loop)


def test_a_refused_destination_reaches_the_user_as_the_generic_message_and_the_log_keeps_the_details(caplog):
    refused = EgressDenied("Connections to intranet.example are not allowed (it resolves to 10.1.2.3).")
    with caplog.at_level("WARNING", logger="cesaflow.providers"):
        error = classify_transport_error(refused)
    assert error.kind is ErrorKind.BLOCKED
    assert error.message == NOT_ALLOWED_MESSAGE
    assert "10.1.2.3" not in error.message
    assert "10.1.2.3" in caplog.text
