"""Checking provider keys against the provider simulator, through the API (``POST /api/v1/provider-keys/{id}/check``)
and the dashboard (the Check button, and the automatic check right after a key is added).

valid / restricted / invalid set the status; unreachable leaves it alone and still leaves an audit event that says
so. Every check opens the key (``key.used``, purpose ``check``) and records ``key.checked``.
"""

from __future__ import annotations

import socket
import uuid
from typing import Any

import pytest
from django.core.cache import cache
from django.urls import reverse
from rest_framework.test import APIClient

from keys.checking import CHECK_CACHE_SECONDS, cached_checks, models_cache_key, provider_key_check, remember_check
from keys.models import KeyStatus, Provider, ProviderKey
from keys.providers import ProbeResult, ProbeStatus
from keys.services import provider_key_create, provider_key_record_check, provider_key_revoke
from runs.models import AuditEvent

# Every test starts with the simulator (``sim``, one per module) empty: its queues and its request log.
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("sim_clean")]

SECRET = "fake-check-key-0123456789"
PAGE = reverse("keys:provider_keys")


def closed_port_url() -> str:
    """A loopback URL nothing listens on: connecting fails at once (the provider is unreachable)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def make_key(cast, sim, *, secret: str = SECRET, provider: str = Provider.OPENAI, base_url: str | None = None, org="a"):
    admin = cast.admin_a if org == "a" else cast.admin_b
    flavour = "openai" if provider == Provider.OPENAI_COMPATIBLE else provider
    return provider_key_create(
        org=admin.org,
        actor=admin.user,
        provider=provider,
        label=f"check-{uuid.uuid4().hex[:8]}",
        secret=secret,
        base_url=base_url if base_url is not None else sim.base_urls[flavour],
    )


def check_url(key) -> str:
    return reverse("keys_api:provider-key-check", kwargs={"key_id": key.id})


def dashboard_check_url(key) -> str:
    return reverse("keys:check", kwargs={"key_id": key.id})


def model_calls(sim) -> list[dict[str, Any]]:
    return [r for r in sim.state.requests() if r["path"].endswith("/models")]


# --- The check itself ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "groq", "anthropic", "openai_compatible"])
def test_a_working_key_checks_valid_with_its_model_list(cast, ring1, sim, provider):
    key = make_key(cast, sim, provider=provider)
    result = provider_key_check(key=key, actor=cast.admin_a.user)

    assert result.status is ProbeStatus.VALID
    assert "fake/echo" in result.models
    key.refresh_from_db()
    assert key.status == KeyStatus.VALID
    assert key.last_checked_at is not None
    # Opened for the check (audited as a use with purpose "check"), and the outcome recorded.
    used = AuditEvent.objects.get(event=AuditEvent.KEY_USED, target_id=str(key.id))
    assert used.metadata["purpose"] == "check"
    checked = AuditEvent.objects.get(event=AuditEvent.KEY_CHECKED, target_id=str(key.id))
    assert (checked.metadata["from"], checked.metadata["to"]) == (KeyStatus.UNCHECKED, KeyStatus.VALID)
    assert checked.actor_user_id == cast.admin_a.user.id
    # The outcome and the model list are cached for the org's model listing, under this org and key only.
    cached = cached_checks(org_id=cast.org_a.id, key_ids=[key.id])[key.id]
    assert (cached.status, cached.models) == (ProbeStatus.VALID, result.models)
    assert cached_checks(org_id=cast.org_b.id, key_ids=[key.id]) == {}


def test_a_scope_restricted_key_is_valid_but_restricted(cast, ring1, sim):
    # The simulator picks a scenario from the key's suffix: this key gets OpenAI's "Missing scopes" 401.
    key = make_key(cast, sim, secret="fake-scoped-0123456789:401_scope")
    result = provider_key_check(key=key, actor=cast.admin_a.user)

    assert result.status is ProbeStatus.RESTRICTED
    assert "Missing scopes" in result.message
    key.refresh_from_db()
    assert key.status == KeyStatus.RESTRICTED


def test_a_rejected_key_is_invalid_and_its_cached_models_are_dropped(cast, ring1, sim):
    key = make_key(cast, sim, secret="fake-invalid")
    remember_check(key=key, result=ProbeResult(status=ProbeStatus.VALID, models=("stale",)))

    result = provider_key_check(key=key, actor=cast.admin_a.user)

    assert result.status is ProbeStatus.INVALID
    key.refresh_from_db()
    assert key.status == KeyStatus.INVALID
    # The negative outcome is cached too (for an hour): no model list, and nothing to re-probe until then.
    cached = cached_checks(org_id=cast.org_a.id, key_ids=[key.id])[key.id]
    assert (cached.status, cached.models) == (ProbeStatus.INVALID, ())
    ttl = cache.ttl(models_cache_key(org_id=cast.org_a.id, key_id=key.id))  # type: ignore[attr-defined]  # django-redis
    assert 0 < ttl <= CHECK_CACHE_SECONDS[ProbeStatus.INVALID]


def test_an_unreachable_check_is_cached_briefly_but_never_hides_a_known_model_list(cast, ring1, sim, settings):
    listed = make_key(cast, sim)
    assert provider_key_check(key=listed, actor=cast.admin_a.user).status is ProbeStatus.VALID
    never_listed = make_key(cast, sim)
    settings.PRODUCTION = True  # the egress policy now refuses loopback: every check is "unreachable"

    assert provider_key_check(key=listed, actor=cast.admin_a.user).status is ProbeStatus.UNREACHABLE
    assert provider_key_check(key=never_listed, actor=cast.admin_a.user).status is ProbeStatus.UNREACHABLE

    cached = cached_checks(org_id=cast.org_a.id, key_ids=[listed.id, never_listed.id])
    assert cached[listed.id].status is ProbeStatus.VALID  # a passing outage says nothing about the key
    assert "fake-model" in cached[listed.id].models
    assert cached[never_listed.id].status is ProbeStatus.UNREACHABLE
    ttl = cache.ttl(models_cache_key(org_id=cast.org_a.id, key_id=never_listed.id))  # type: ignore[attr-defined]  # django-redis
    assert 0 < ttl <= CHECK_CACHE_SECONDS[ProbeStatus.UNREACHABLE]


def test_an_unreachable_provider_leaves_the_status_unchanged_but_is_audited(cast, ring1, sim):
    key = make_key(cast, sim, base_url=closed_port_url())
    provider_key_record_check(key=key, actor=cast.admin_a.user, status=KeyStatus.VALID)

    result = provider_key_check(key=key, actor=cast.admin_a.user)

    assert result.status is ProbeStatus.UNREACHABLE
    key.refresh_from_db()
    assert key.status == KeyStatus.VALID
    latest = AuditEvent.objects.filter(event=AuditEvent.KEY_CHECKED, target_id=str(key.id)).order_by("-created_at")[0]
    assert (latest.metadata["from"], latest.metadata["to"]) == (KeyStatus.VALID, KeyStatus.VALID)
    assert latest.metadata["detail"].startswith("unreachable, status unchanged")


def test_production_egress_policy_guards_the_check(cast, ring1, sim, settings):
    key = make_key(cast, sim)  # saved in development, where loopback is allowed
    settings.PRODUCTION = True

    refused = provider_key_check(key=key, actor=cast.admin_a.user)
    assert refused.status is ProbeStatus.UNREACHABLE
    assert "not allowed" in refused.message
    assert model_calls(sim) == []  # refused before any connection
    key.refresh_from_db()
    assert key.status == KeyStatus.UNCHECKED

    settings.PROVIDER_HOST_ALLOWLIST = ["127.0.0.1"]
    assert provider_key_check(key=key, actor=cast.admin_a.user).status is ProbeStatus.VALID


def test_the_audit_trail_never_holds_the_secret(cast, ring1, sim):
    key = make_key(cast, sim, secret="fake-invalid-with-a-long-tail-0123456789")
    provider_key_check(key=key, actor=cast.admin_a.user)
    for event in AuditEvent.objects.all():
        assert "long-tail" not in str(event.metadata)


# --- API ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["api_key", "session"])
def test_admin_checks_a_key_through_the_api(cast, ring1, sim, auth):
    key = make_key(cast, sim)
    client = cast.admin_a.api() if auth == "api_key" else cast.admin_a.session_api()
    response = client.post(check_url(key))

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"] == str(key.id)
    assert body["status"] == "valid"
    assert body["last_checked_at"]
    assert body["check"]["status"] == "valid"
    assert "fake-model" in body["check"]["models"]
    assert SECRET not in response.content.decode()
    checked = AuditEvent.objects.get(event=AuditEvent.KEY_CHECKED, target_id=str(key.id))
    if auth == "api_key":
        assert checked.actor_api_key_id == cast.admin_a.api_key.id
    else:
        assert checked.actor_user_id == cast.admin_a.user.id


@pytest.mark.parametrize(
    ("secret", "base_url", "status", "check"),
    [
        ("fake-scoped-0123456789:401_scope", None, "restricted", "restricted"),
        ("fake-invalid", None, "invalid", "invalid"),
        (SECRET, "closed", "unchecked", "unreachable"),
    ],
)
def test_api_reports_each_outcome(cast, ring1, sim, secret, base_url, status, check):
    key = make_key(cast, sim, secret=secret, base_url=closed_port_url() if base_url == "closed" else None)
    body = cast.admin_a.api().post(check_url(key)).json()
    assert (body["status"], body["check"]["status"]) == (status, check)
    assert body["check"]["models"] == []
    assert body["check"]["message"]


def _nothing_happened(sim, key) -> None:
    assert model_calls(sim) == []
    assert not AuditEvent.objects.filter(event__in=[AuditEvent.KEY_CHECKED, AuditEvent.KEY_USED]).exists()
    assert ProviderKey.objects.get(pk=key.pk).last_checked_at is None


def test_api_check_refuses_anonymous_outsiders_developers_and_other_orgs(cast, ring1, sim):
    key = make_key(cast, sim)
    url = check_url(key)

    assert APIClient().post(url).status_code == 401
    assert cast.outsider.session_api().post(url).status_code == 404
    assert cast.admin_b.api().post(url).status_code == 404  # another org's key looks missing
    assert cast.admin_b.api().post(check_url(make_key(cast, sim, org="b"))).status_code == 200
    sim.state.reset()
    AuditEvent.objects.all().delete()
    ProviderKey.objects.filter(org=cast.org_b).delete()
    for client in (cast.dev_a.api(), cast.dev_a.session_api()):
        response = client.post(url)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "permission_denied"
    random_id = reverse("keys_api:provider-key-check", kwargs={"key_id": uuid.uuid4()})
    assert cast.admin_a.api().post(random_id).status_code == 404
    assert cast.admin_a.api().get(url).status_code == 405
    _nothing_happened(sim, key)


def test_api_check_of_a_revoked_key_is_a_conflict(cast, ring1, sim):
    key = make_key(cast, sim)
    provider_key_revoke(key=key, actor=cast.admin_a.user)
    response = cast.admin_a.api().post(check_url(key))
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "key_revoked"
    assert model_calls(sim) == []


# --- Dashboard ----------------------------------------------------------------------------------------------------


def _flashes(response) -> list[tuple[str, str]]:
    return [(m.level_tag, str(m)) for m in response.context["messages"]]


def test_adding_a_key_checks_it_at_once_and_shows_the_models(cast, ring1, sim):
    form = {"provider": "openai", "label": "fresh", "secret": SECRET, "base_url": sim.base_urls["openai"]}
    response = cast.admin_a.client().post(PAGE, form, follow=True)

    assert response.status_code == 200
    flashes = _flashes(response)
    assert flashes[0][0] == "success"
    assert "was added" in flashes[0][1]
    assert flashes[1][0] == "success"
    assert "is valid" in flashes[1][1]
    assert "fake-model" in flashes[1][1]
    assert "more" in flashes[1][1]  # the simulator lists more models than the preview shows
    key = ProviderKey.objects.get(org=cast.org_a, label="fresh")
    assert key.status == KeyStatus.VALID
    assert AuditEvent.objects.filter(event=AuditEvent.KEY_CHECKED, target_id=str(key.id)).exists()
    assert SECRET not in response.content.decode()


def test_adding_a_rejected_key_says_so(cast, ring1, sim):
    form = {"provider": "anthropic", "label": "typo", "secret": "fake-invalid", "base_url": sim.base_urls["anthropic"]}
    response = cast.admin_a.client().post(PAGE, form, follow=True)
    assert ("error", "“typo” (…alid) was rejected by the provider: it is invalid. invalid x-api-key") in _flashes(
        response
    )
    assert ProviderKey.objects.get(label="typo").status == KeyStatus.INVALID


def test_check_button_reports_each_outcome_as_a_flash(cast, ring1, sim):
    client = cast.admin_a.client()
    restricted = make_key(cast, sim, secret="fake-scoped-0123456789:401_scope")
    unreachable = make_key(cast, sim, base_url=closed_port_url())

    first = client.post(dashboard_check_url(restricted), follow=True)
    assert first.redirect_chain == [(PAGE, 302)]
    assert _flashes(first)[0][0] == "warning"
    assert "valid but restricted" in _flashes(first)[0][1]
    second = client.post(dashboard_check_url(unreachable), follow=True)
    assert _flashes(second)[0][0] == "warning"
    assert "could not be checked; its status is unchanged" in _flashes(second)[0][1]
    assert ProviderKey.objects.get(pk=unreachable.pk).status == KeyStatus.UNCHECKED


def test_check_button_is_offered_to_admins_for_live_keys_only(cast, ring1, sim):
    live = make_key(cast, sim)
    revoked = make_key(cast, sim)
    provider_key_revoke(key=revoked, actor=cast.admin_a.user)

    admin_page = cast.admin_a.client().get(PAGE).content.decode()
    assert dashboard_check_url(live) in admin_page
    assert dashboard_check_url(revoked) not in admin_page
    assert dashboard_check_url(live) not in cast.dev_a.client().get(PAGE).content.decode()


def test_dashboard_check_refuses_developers_other_orgs_and_anonymous(cast, ring1, sim):
    key = make_key(cast, sim)
    url = dashboard_check_url(key)

    assert cast.dev_a.client().post(url).status_code == 403
    assert cast.admin_b.client().post(url).status_code == 404
    anonymous = APIClient().post(url)
    assert anonymous.status_code == 302
    assert reverse("orgs:login") in anonymous["Location"]
    assert cast.admin_a.client().get(url).status_code == 405
    revoked = make_key(cast, sim)
    provider_key_revoke(key=revoked, actor=cast.admin_a.user)
    assert cast.admin_a.client().post(dashboard_check_url(revoked)).status_code == 404
    _nothing_happened(sim, key)
