"""The in-process API-key cache (orgs.api_key_cache): fewer queries per request, and nothing it remembers outlives a
change: revocation, expiry, a disabled creator, a suspended org, a flushed Redis all take effect on the next
request."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from cesaflow.lib import row_cache
from orgs import api_key_cache
from orgs.models import ApiKey
from orgs.moderation import org_suspend
from orgs.services import api_key_revoke
from orgs.tokens import api_key_digest

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/api/v1/org"


def _queries(client) -> int:
    with CaptureQueriesContext(connection) as captured:
        assert client.get(URL).status_code == 200
    return len(captured.captured_queries)


def test_a_recently_verified_key_costs_fewer_queries(cast):
    client = cast.dev_a.api()
    first = _queries(client)
    second = _queries(client)
    assert second < first


def test_revocation_takes_effect_on_the_next_request(cast):
    client = cast.dev_a.api()
    _queries(client)
    _queries(client)  # now answered from the cache
    api_key_revoke(api_key=cast.dev_a.api_key, actor=cast.admin_a.user)
    assert client.get(URL).status_code == 401


def test_expiry_is_checked_on_every_hit(cast):
    client = cast.dev_a.api()
    _queries(client)
    # An expiry reached while cached (no save involved: time passes) refuses the key.
    entry_key = api_key_digest(cast.dev_a.api_secret)
    cached = api_key_cache.recall(digest=entry_key, token=row_cache.generation())
    assert cached is not None
    cached.expires_at = timezone.now() - timedelta(seconds=1)
    api_key_cache.touch(digest=entry_key, api_key=cached)
    # The same expiry in the row, written without a save (so the generation stays): only the check on the hit can
    # notice, since the cached entry is otherwise still trusted.
    ApiKey.objects.filter(pk=cast.dev_a.api_key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert client.get(URL).status_code == 401


def test_a_disabled_creator_and_a_suspended_org_take_effect_at_once(cast):
    client = cast.dev_a.api()
    _queries(client)
    cast.dev_a.user.is_active = False
    cast.dev_a.user.save(update_fields=["is_active"])
    assert client.get(URL).status_code == 401
    admin = cast.admin_a.api()
    _queries(admin)
    org_suspend(org=cast.org_a, actor="CesaFlow operator (t@ops.example)", reason="test")
    response = admin.get(URL)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "org_suspended"


def test_a_flushed_shared_cache_distrusts_every_entry(cast):
    client = cast.dev_a.api()
    _queries(client)
    # Revoked behind the application's back (no signal, no save), then Redis restarts empty: the generation token
    # is gone, so the cached entry is not trusted and the database answers.
    ApiKey.objects.filter(pk=cast.dev_a.api_key.pk).update(revoked_at=timezone.now())
    cache.delete(row_cache.GENERATION_KEY)
    assert client.get(URL).status_code == 401


def test_the_cache_holds_digests_and_column_values_never_the_key(cast):
    client = cast.dev_a.api()
    _queries(client)
    stored = repr(list(api_key_cache.cache.entries.items()))
    assert cast.dev_a.api_secret not in stored
