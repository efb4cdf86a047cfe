"""Dashboard pages for provider keys: who may see and do what, and a key that is never echoed back."""

from __future__ import annotations

import uuid

import pytest
from django.test import Client
from django.urls import reverse

from keys.models import KeyStatus, ProviderKey
from runs.models import AuditEvent
from tests.keys.conftest import fake_secret

pytestmark = pytest.mark.django_db

PAGE = reverse("keys:provider_keys")
DISABLE_ALL = reverse("keys:disable_all")


def _revoke_url(key) -> str:
    return reverse("keys:revoke", kwargs={"key_id": key.id})


def _form(**overrides):
    return {"provider": "openai", "label": "dash", "secret": fake_secret(), "base_url": "", **overrides}


# --- Access -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url_name"),
    [("get", "page"), ("post", "page"), ("post", "revoke"), ("get", "disable_all"), ("post", "disable_all")],
)
def test_anonymous_is_sent_to_the_login_page(cast, key_a, method, url_name):
    url = {"page": PAGE, "revoke": _revoke_url(key_a), "disable_all": DISABLE_ALL}[url_name]
    response = getattr(Client(), method)(url, _form())
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("orgs:login"))
    assert ProviderKey.objects.get(pk=key_a.pk).status == KeyStatus.UNCHECKED


@pytest.mark.parametrize(("method", "url_name"), [("get", "page"), ("post", "revoke"), ("post", "disable_all")])
def test_outsider_without_an_org_sees_nothing_and_changes_nothing(cast, key_a, method, url_name):
    url = {"page": PAGE, "revoke": _revoke_url(key_a), "disable_all": DISABLE_ALL}[url_name]
    response = getattr(cast.outsider.client(), method)(url, {"confirm": "yes"})
    # No org: the gate sends them to create one; nothing of org A is shown or touched.
    assert response.status_code == 302
    assert response["Location"] == reverse("orgs:org_create")
    assert ProviderKey.objects.get(pk=key_a.pk).status == KeyStatus.UNCHECKED


def test_developer_sees_the_list_without_write_controls(cast, key_a, secret_a):
    response = cast.dev_a.client().get(PAGE)
    assert response.status_code == 200
    html = response.content.decode()
    assert "prod" in html
    assert f"…{secret_a[-4:]}" in html
    assert 'type="password"' not in html
    assert _revoke_url(key_a) not in html
    assert DISABLE_ALL not in html
    assert secret_a not in html


@pytest.mark.parametrize(
    ("method", "url_name"), [("post", "page"), ("post", "revoke"), ("get", "disable_all"), ("post", "disable_all")]
)
def test_developer_gets_403_on_every_write(cast, key_a, method, url_name):
    url = {"page": PAGE, "revoke": _revoke_url(key_a), "disable_all": DISABLE_ALL}[url_name]
    response = getattr(cast.dev_a.client(), method)(url, {**_form(), "confirm": "yes"})
    assert response.status_code == 403
    assert ProviderKey.objects.filter(org=cast.org_a).count() == 1
    assert ProviderKey.objects.get(pk=key_a.pk).status == KeyStatus.UNCHECKED


def test_other_orgs_key_id_is_a_404_like_a_random_one(cast, key_a):
    client = cast.admin_b.client()
    assert client.post(_revoke_url(key_a)).status_code == 404
    assert client.post(reverse("keys:revoke", kwargs={"key_id": uuid.uuid4()})).status_code == 404
    assert ProviderKey.objects.get(pk=key_a.pk).status == KeyStatus.UNCHECKED


def test_the_list_never_shows_another_orgs_keys(cast, key_a, key_b):
    html = cast.admin_b.client().get(PAGE).content.decode()
    assert str(key_b.id) in html
    assert str(key_a.id) not in html
    assert key_a.last_four not in html


def test_revoke_needs_post(cast, key_a):
    assert cast.admin_a.client().get(_revoke_url(key_a)).status_code == 405


# --- Admin ----------------------------------------------------------------------------------------------------------


def test_admin_adds_a_key_and_sees_only_its_last_four(cast, ring1):
    client = cast.admin_a.client()
    page = client.get(PAGE).content.decode()
    assert 'type="password"' in page
    data = _form()
    response = client.post(PAGE, data, follow=True)
    assert response.status_code == 200
    html = response.content.decode()
    assert data["secret"] not in html
    assert f"…{data['secret'][-4:]}" in html
    key = ProviderKey.objects.get(org=cast.org_a, label="dash")
    assert key.created_by == cast.admin_a.user
    assert AuditEvent.objects.filter(event=AuditEvent.KEY_CREATED, target_id=str(key.id)).exists()


def test_a_rejected_form_never_echoes_the_key(cast, ring1):
    data = _form(label="bad/label")
    response = cast.admin_a.client().post(PAGE, data)
    assert response.status_code == 400
    html = response.content.decode()
    assert "cannot contain" in html
    assert data["secret"] not in html
    assert 'value="bad/label"' in html  # the other fields are kept for correction
    assert not ProviderKey.objects.exists()


def test_service_errors_land_on_their_field(cast, ring1):
    response = cast.admin_a.client().post(PAGE, _form(provider="openai_compatible", base_url="http://10.0.0.9/v1"))
    assert response.status_code == 400
    assert "This address is not allowed" in response.content.decode()


def test_admin_revokes_a_key(cast, key_a):
    response = cast.admin_a.client().post(_revoke_url(key_a), follow=True)
    assert response.status_code == 200
    assert "was revoked" in response.content.decode()
    assert ProviderKey.objects.get(pk=key_a.pk).status == KeyStatus.REVOKED


def test_disable_all_asks_for_confirmation_first(cast, key_a, key_b):
    client = cast.admin_a.client()
    page = client.get(DISABLE_ALL)
    assert page.status_code == 200
    assert "1 active provider key" in page.content.decode()
    refused = client.post(DISABLE_ALL, {})
    assert refused.status_code == 400
    assert ProviderKey.objects.get(pk=key_a.pk).status == KeyStatus.UNCHECKED

    done = client.post(DISABLE_ALL, {"confirm": "yes"}, follow=True)
    assert done.status_code == 200
    assert ProviderKey.objects.get(pk=key_a.pk).status == KeyStatus.REVOKED
    assert ProviderKey.objects.get(pk=key_b.pk).status == KeyStatus.UNCHECKED
    assert AuditEvent.objects.filter(event=AuditEvent.KEYS_DISABLED_ALL, org=cast.org_a).count() == 1


def test_pages_carry_no_inline_script_or_style(cast, key_a):
    client = cast.admin_a.client()
    for url in (PAGE, DISABLE_ALL):
        html = client.get(url).content.decode()
        assert "<script>" not in html
        assert " style=" not in html
        assert " onclick=" not in html
