"""Key checks against the provider simulator: each answer maps to valid / restricted / invalid / unreachable."""

from __future__ import annotations

import secrets
import socket

import pytest

from cesaflow.lib.http import EgressPolicy, close_http_clients, get_http_client
from keys.providers import PROVIDERS, ProbeStatus, ProviderName, probe_models, provider_spec

# Every test starts with the simulator (``sim``, one per module) empty: its queues and its request log.
pytestmark = pytest.mark.usefixtures("sim_clean")

KEY = "fake-probe-key-123456"


@pytest.fixture
async def client():
    yield get_http_client(EgressPolicy.build(allow_private=True))
    await close_http_clients()


def _base(sim, provider: str) -> str:
    flavour = "openai" if provider == "openai_compatible" else provider
    return str(sim.base_urls[flavour])


@pytest.mark.parametrize("provider", ["openai", "groq", "anthropic", "openai_compatible"])
async def test_valid_key_lists_models(sim, client, provider):
    result = await probe_models(provider, _base(sim, provider), KEY, client)

    assert result.status is ProbeStatus.VALID
    assert ("fake-claude" if provider == "anthropic" else "fake-model") in result.models
    assert "fake/echo" in result.models
    assert result.http_status == 200


async def test_request_uses_the_documented_call_and_headers(sim, client):
    await probe_models("anthropic", sim.base_urls["anthropic"], KEY, client)
    await probe_models("openai", sim.base_urls["openai"], KEY, client)

    anthropic_call, openai_call = sim.state.requests()
    assert (anthropic_call["method"], anthropic_call["path"]) == ("GET", "/anthropic/v1/models")
    assert anthropic_call["headers"]["anthropic-version"] == "2023-06-01"
    assert anthropic_call["headers"]["x-api-key"] == KEY[:8] + "***"
    assert openai_call["path"] == "/openai/v1/models"
    assert openai_call["headers"]["authorization"] == f"Bearer {KEY[:8]}***"


@pytest.mark.parametrize("provider", ["openai", "groq", "anthropic"])
async def test_rejected_key_is_invalid(sim, client, provider):
    result = await probe_models(provider, _base(sim, provider), "fake-invalid", client)

    assert result.status is ProbeStatus.INVALID
    assert result.http_status == 401


@pytest.mark.parametrize("provider", ["openai", "groq"])
async def test_scope_restricted_key_is_valid_but_restricted(sim, client, provider):
    result = await probe_models(provider, _base(sim, provider), "fake-scoped:401_scope", client)

    assert result.status is ProbeStatus.RESTRICTED
    assert "Missing scopes" in result.message


async def test_forbidden_listing_is_restricted_not_invalid(sim, client):
    sim.state.enqueue("anthropic", [{"match": {"endpoint": "models"}, "fault": {"type": "http", "status": 403}}])
    result = await probe_models("anthropic", sim.base_urls["anthropic"], KEY, client)

    assert result.status is ProbeStatus.RESTRICTED


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_out_of_quota_key_is_valid_with_a_message(sim, client, provider):
    result = await probe_models(provider, _base(sim, provider), "fake-broke:429_quota", client)

    assert result.status is ProbeStatus.VALID
    assert result.message


@pytest.mark.parametrize("scenario", ["500", "429", "529"])
async def test_provider_errors_leave_the_status_unknown(sim, client, scenario):
    result = await probe_models("openai", sim.base_urls["openai"], f"fake-x:{scenario}", client)

    assert result.status is ProbeStatus.UNREACHABLE


async def test_network_failure_is_unreachable(client):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = await probe_models("openai", f"http://127.0.0.1:{port}/v1", KEY, client)

    assert result.status is ProbeStatus.UNREACHABLE
    assert result.http_status is None


async def test_blocked_destination_is_unreachable_and_says_why(sim):
    production = get_http_client(EgressPolicy.build(allow_private=False))
    try:
        result = await probe_models("openai", sim.base_urls["openai"], KEY, production)
    finally:
        await close_http_clients()

    assert result.status is ProbeStatus.UNREACHABLE
    assert "not allowed" in result.message
    assert sim.state.requests() == []


async def test_wrong_base_url_is_unreachable_not_invalid(sim, client):
    # An OpenAI-compatible server at another path answers 404: nothing is known about the key.
    result = await probe_models("openai_compatible", sim.simulator.base_url + "/openai/v2", KEY, client)

    assert result.status is ProbeStatus.UNREACHABLE
    assert result.http_status == 404


async def test_a_key_echoed_by_the_provider_never_reaches_the_message(sim, client):
    secret = "fake-sk-proj-CANARY" + secrets.token_hex(8)
    body = {"error": {"message": "Incorrect API key provided: {{api_key}}", "code": "invalid_api_key"}}
    sim.state.enqueue(
        "openai", [{"match": {"endpoint": "models"}, "fault": {"type": "http", "status": 401, "body": body}}]
    )
    result = await probe_models("openai", sim.base_urls["openai"], secret, client)

    assert result.status is ProbeStatus.INVALID
    assert "CANARY" not in result.message
    assert "CANARY" not in repr(result)


async def test_openai_compatible_needs_a_base_url(client):
    result = await probe_models("openai_compatible", None, KEY, client)

    assert result.status is ProbeStatus.UNREACHABLE
    assert "base URL" in result.message


def test_catalog_has_the_official_base_urls_and_auth_headers(official_provider_specs):
    official = official_provider_specs  # the catalog as shipped, before the conftest points it at loopback
    assert {p.value for p in ProviderName} == {"openai", "anthropic", "groq", "openai_compatible"}
    assert official[ProviderName.OPENAI].base_url() == "https://api.openai.com/v1"
    assert official[ProviderName.ANTHROPIC].base_url() == "https://api.anthropic.com"
    assert official[ProviderName.GROQ].base_url() == "https://api.groq.com/openai/v1"
    assert PROVIDERS[ProviderName.OPENAI].base_url() == "http://127.0.0.1:9/v1"  # tests never leave the machine
    assert provider_spec("openai_compatible").base_url("https://llm.example.com/v1/") == "https://llm.example.com/v1"
    assert provider_spec("anthropic").auth_headers("k") == {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    assert provider_spec("groq").auth_headers("k") == {"authorization": "Bearer k"}
    with pytest.raises(ValueError, match="mistral"):
        provider_spec("mistral")
