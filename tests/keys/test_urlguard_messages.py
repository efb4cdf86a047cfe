"""Where the URL guard's refusal reaches a user (API, dashboard form, key check), it is the one generic message:
no resolved address, no resolver output. The operator's log has the details (issue #14 point 5)."""

from __future__ import annotations

import logging

import pytest
from django.urls import reverse

from keys.checking import provider_key_check
from keys.models import Provider, ProviderKey
from keys.providers import ProbeStatus
from keys.services import provider_key_create
from keys.urlguard import NOT_ALLOWED_MESSAGE
from runs.models import AuditEvent
from runs.simulator import SimulatorThread
from tests.keys.conftest import fake_secret

pytestmark = pytest.mark.django_db

# "localhost" resolves to a loopback address on every machine: an internal name with a known answer.
INTERNAL = "https://localhost:8443/v1"
LEAKS = ("127.0.0.1", "::1", "loopback", "resolve")


def _assert_generic(text: str) -> None:
    assert "This address is not allowed" in text
    for leak in LEAKS:
        assert leak not in text


def test_the_api_answers_the_generic_message_and_logs_the_details(cast, ring1, settings, caplog):
    settings.PRODUCTION = True
    body = {"provider": "openai_compatible", "label": "internal", "secret": fake_secret(), "base_url": INTERNAL}
    response = cast.admin_a.api().post(reverse("keys_api:provider-key-list"), body, format="json")

    assert response.status_code == 400
    assert response.json()["error"]["details"]["fields"]["base_url"] == [NOT_ALLOWED_MESSAGE]
    _assert_generic(response.content.decode())
    assert "'localhost' resolves to 127.0.0.1, which is a loopback address" in caplog.text
    assert not ProviderKey.objects.exists()


def test_the_dashboard_form_answers_the_generic_message(cast, ring1, settings, caplog):
    settings.PRODUCTION = True
    form = {"provider": "openai_compatible", "label": "internal", "secret": fake_secret(), "base_url": INTERNAL}
    response = cast.admin_a.client().post(reverse("keys:provider_keys"), form)

    assert response.status_code == 400
    _assert_generic(response.content.decode())
    assert "resolves to 127.0.0.1" in caplog.text


@pytest.fixture(scope="module")
def sim():
    thread = SimulatorThread(record_requests=True).start()
    yield thread
    thread.stop()


def test_a_key_check_refused_by_the_egress_policy_says_only_the_generic_message(cast, ring1, sim, settings, caplog):
    # Saved in development (loopback allowed) under a name; the deployment then runs in production.
    key = provider_key_create(
        org=cast.org_a,
        actor=cast.admin_a.user,
        provider=Provider.OPENAI_COMPATIBLE,
        label="by-name",
        secret=fake_secret(),
        base_url=sim.base_urls["openai"].replace("127.0.0.1", "localhost"),
    )
    settings.PRODUCTION = True
    sim.state.reset()

    with caplog.at_level(logging.WARNING, logger="keys.providers"):
        result = provider_key_check(key=key, actor=cast.admin_a.user)

    assert result.status is ProbeStatus.UNREACHABLE
    assert result.message == NOT_ALLOWED_MESSAGE
    detail = AuditEvent.objects.get(event=AuditEvent.KEY_CHECKED, target_id=str(key.pk)).metadata["detail"]
    _assert_generic(detail)
    assert sim.state.requests() == []
    assert "refused by the egress policy: Connections to localhost" in caplog.text
