"""keys.services: sealing before the INSERT, validation, opening for one call (audited), fail-closed opening of
tampered rows, revocation and "disable all" (issue #3 points 1-4 and 8; security.md §9 tests 2, 6, 9, 44)."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from django.views.debug import ExceptionReporter

from keys.crypto import Secret, stored_kid
from keys.models import KeyStatus, Provider, ProviderKey
from keys.services import (
    ProviderKeyDecryptionError,
    ProviderKeyUnavailable,
    aprovider_key_open,
    provider_key_create,
    provider_key_open,
    provider_key_record_check,
    provider_key_record_use,
    provider_key_revoke,
    provider_keys_disable_all,
)
from keys.urlguard import NOT_ALLOWED_MESSAGE
from runs.models import AuditEvent
from tests.keys.conftest import fake_secret, make_ring

pytestmark = pytest.mark.django_db


def _audit_text() -> str:
    rows = AuditEvent.objects.values("actor_label", "target_id", "metadata", "user_agent")
    return json.dumps(list(rows), default=str)


def _events(event: str, org=None):
    qs = AuditEvent.objects.filter(event=event)
    return qs.filter(org=org) if org is not None else qs


# --- Create -------------------------------------------------------------------------------------------------


def test_create_seals_before_one_insert_and_the_plaintext_never_reaches_sql(cast, ring1):
    secret = fake_secret()
    with CaptureQueriesContext(connection) as queries:
        key = provider_key_create(
            org=cast.org_a, actor=cast.admin_a.user, provider=Provider.OPENAI, label="prod", secret=secret
        )
    sql = [q["sql"] for q in queries.captured_queries]
    inserts = [s for s in sql if s.startswith('INSERT INTO "keys_providerkey"')]
    assert len(inserts) == 1
    assert not [s for s in sql if s.startswith('UPDATE "keys_providerkey"')]
    assert key.sealed_secret in inserts[0]  # the captured SQL shows the values, so the next line means something
    assert not [s for s in sql if secret in s or secret[8:40] in s]
    key.refresh_from_db()
    assert key.kid == 1 == stored_kid(key.sealed_secret)
    assert key.last_four == secret[-4:]
    assert key.status == KeyStatus.UNCHECKED
    assert key.created_by == cast.admin_a.user
    assert key.created_by_label == cast.admin_a.user.email


def test_create_records_key_created_without_the_secret(cast, key_a, secret_a):
    event = _events(AuditEvent.KEY_CREATED, cast.org_a).get()
    assert event.target_id == str(key_a.id)
    assert event.actor_user == cast.admin_a.user
    assert event.metadata["last_four"] == secret_a[-4:]
    assert secret_a not in _audit_text()
    assert key_a.sealed_secret not in _audit_text()


def test_no_field_repr_or_str_of_the_model_holds_the_plaintext(key_a, secret_a):
    key = ProviderKey.objects.get(pk=key_a.pk)
    values = [str(getattr(key, f.attname)) for f in ProviderKey._meta.concrete_fields]
    assert not [v for v in values if secret_a in v]
    assert secret_a not in repr(key)
    assert secret_a not in str(key)
    assert repr(key) == f"<ProviderKey 'prod' …{secret_a[-4:]}>"
    assert not hasattr(key, "secret")
    assert not hasattr(key, "plaintext")


def test_short_secrets_do_not_show_their_last_four(cast, ring1):
    key = provider_key_create(
        org=cast.org_a,
        actor=cast.admin_a.user,
        provider=Provider.OPENAI_COMPATIBLE,
        label="ollama",
        secret="ollama1",
        base_url="http://127.0.0.1:11434/v1",
    )
    assert key.last_four == ""
    assert key.base_url == "http://127.0.0.1:11434/v1"


def test_create_by_api_key_labels_the_creator(cast, ring1):
    key = provider_key_create(
        org=cast.org_a, actor=cast.admin_a.api_key, provider=Provider.GROQ, label="ci", secret=fake_secret("gsk_")
    )
    assert key.created_by is None
    assert key.created_by_label.startswith("API key alice key")


@pytest.mark.parametrize(
    ("fields", "error_field"),
    [
        ({"provider": "mistral"}, "provider"),
        ({"label": ""}, "label"),
        ({"label": "team/prod"}, "label"),
        ({"label": "x" * 101}, "label"),
        ({"label": "bad\x1b[31m"}, "label"),
        ({"secret": ""}, "secret"),
        ({"secret": "   "}, "secret"),
        ({"secret": "sk-proj-has space inside"}, "secret"),
        ({"secret": "sk-proj-newline\r\nX-Injected: 1"}, "secret"),
        ({"secret": "sk-proj-ünïcode-key"}, "secret"),
        ({"secret": "sk-" + "a" * 5000}, "secret"),
        ({"provider": Provider.OPENAI_COMPATIBLE, "base_url": ""}, "base_url"),
        ({"provider": Provider.OPENAI_COMPATIBLE, "base_url": "http://10.0.0.7:8000/v1"}, "base_url"),
        ({"base_url": "http://169.254.169.254/latest"}, "base_url"),
        ({"base_url": "https://user:pw@127.0.0.1/v1"}, "base_url"),
        ({"base_url": "file:///etc/passwd"}, "base_url"),
    ],
)
def test_invalid_input_is_a_field_error_that_never_quotes_the_secret(cast, ring1, fields, error_field):
    data = {"provider": Provider.OPENAI, "label": "prod", "secret": fake_secret(), "base_url": None, **fields}
    with pytest.raises(ValidationError) as info:
        provider_key_create(org=cast.org_a, actor=cast.admin_a.user, **data)
    assert error_field in info.value.message_dict
    assert data["secret"].strip() == "" or data["secret"] not in str(info.value.message_dict)
    assert not ProviderKey.objects.exists()


def test_labels_are_unique_per_org_case_insensitively_and_freed_by_revoking(cast, key_a, key_b):
    with pytest.raises(ValidationError) as info:
        provider_key_create(
            org=cast.org_a, actor=cast.admin_a.user, provider=Provider.GROQ, label="PROD", secret=fake_secret()
        )
    assert "label" in info.value.message_dict
    provider_key_revoke(key=key_a, actor=cast.admin_a.user)
    again = provider_key_create(
        org=cast.org_a, actor=cast.admin_a.user, provider=Provider.GROQ, label="prod", secret=fake_secret()
    )
    assert again.label == "prod"


def test_production_refuses_a_private_base_url_unless_allowlisted(cast, ring1, settings):
    settings.PRODUCTION = True
    args = {"org": cast.org_a, "actor": cast.admin_a.user, "provider": Provider.OPENAI_COMPATIBLE}
    with pytest.raises(ValidationError) as info:
        provider_key_create(**args, label="ollama", secret=fake_secret(), base_url="http://127.0.0.1:11434/v1")
    assert info.value.message_dict["base_url"] == [NOT_ALLOWED_MESSAGE]
    settings.PROVIDER_HOST_ALLOWLIST = ["127.0.0.1"]
    key = provider_key_create(**args, label="ollama", secret=fake_secret(), base_url="http://127.0.0.1:11434/v1")
    assert key.base_url == "http://127.0.0.1:11434/v1"


def test_an_error_report_from_inside_create_hides_the_secret(cast, settings):
    """Django's error reports (500 e-mails, technical pages) show frame locals; sensitive_variables hides the
    key in the service frame and in the crypto frames below it."""
    settings.KEYRING = object()  # a broken keyring makes seal() blow up with the plaintext in its locals
    secret = fake_secret()
    try:
        provider_key_create(org=cast.org_a, actor=cast.admin_a.user, provider=Provider.OPENAI, label="p", secret=secret)
    except AttributeError:
        report = ExceptionReporter(None, *sys.exc_info()).get_traceback_text()
    else:
        pytest.fail("a broken keyring must not seal")
    assert "provider_key_create" in report
    assert "********************" in report  # the reporter did see the sensitive locals, and masked them
    assert secret not in report
    assert secret[8:30] not in report


# --- Opening a key for one call -------------------------------------------------------------------------------


def test_open_yields_the_secret_for_one_call_audits_and_drops_it(cast, key_a, secret_a):
    with provider_key_open(key=key_a, actor=cast.dev_a.user, purpose="run", reference="run-123") as secret:
        assert isinstance(secret, Secret)
        assert secret.reveal() == secret_a
        assert secret_a not in repr(secret)
    assert secret.dropped
    with pytest.raises(RuntimeError):
        secret.reveal()
    event = _events(AuditEvent.KEY_USED, cast.org_a).get()
    assert event.metadata["purpose"] == "run"
    assert event.metadata["reference"] == "run-123"
    assert event.actor_user == cast.dev_a.user
    assert event.target_id == str(key_a.id)
    key_a.refresh_from_db()
    assert key_a.last_used_at is not None
    assert secret_a not in _audit_text()


def test_every_opening_is_audited(key_a):
    for n in range(3):
        with provider_key_open(key=key_a, purpose="run", reference=f"run-{n}"):
            pass
    assert _events(AuditEvent.KEY_USED).count() == 3


def test_the_secret_is_dropped_even_when_the_call_fails(key_a):
    with pytest.raises(ZeroDivisionError), provider_key_open(key=key_a, purpose="run") as secret:
        1 / 0  # noqa: B018
    assert secret.dropped


def test_a_revoked_key_cannot_be_opened_even_through_a_stale_object(cast, key_a):
    stale = ProviderKey.objects.get(pk=key_a.pk)
    provider_key_revoke(key=key_a, actor=cast.admin_a.user)
    with pytest.raises(ProviderKeyUnavailable), provider_key_open(key=stale, purpose="run"):
        pytest.fail("a revoked key was opened")
    assert not _events(AuditEvent.KEY_USED).exists()


def _raw_update(key: ProviderKey, **columns: object) -> None:
    """Tamper with the row behind the ORM's back, as an attacker with database access would."""
    assignments = ", ".join(f"{name} = %s" for name in columns)
    with connection.cursor() as cursor:
        params: list[Any] = [*columns.values(), key.pk]
        cursor.execute(f"UPDATE keys_providerkey SET {assignments} WHERE id = %s", params)  # noqa: S608


def _assert_fails_closed(key: ProviderKey, org) -> None:
    called = False
    with pytest.raises(ProviderKeyDecryptionError) as info, provider_key_open(key=key, purpose="run", reference="r1"):
        called = True  # the provider call would happen here
    assert not called
    assert str(info.value) == "This provider key could not be decrypted. An admin must add it again."
    event = _events(AuditEvent.KEY_DECRYPT_FAILED, org).get()
    assert event.target_id == str(key.pk)
    assert event.metadata["purpose"] == "run"
    assert not _events(AuditEvent.KEY_USED).exists()


def test_ciphertext_copied_onto_another_orgs_row_fails_closed_and_is_audited(cast, key_a, key_b, secret_a):
    _raw_update(key_b, sealed_secret=key_a.sealed_secret)
    _assert_fails_closed(key_b, cast.org_b)
    assert secret_a not in _audit_text()


def test_ciphertext_copied_onto_another_key_of_the_same_org_fails_closed(cast, key_a):
    other = provider_key_create(
        org=cast.org_a, actor=cast.admin_a.user, provider=Provider.OPENAI, label="other", secret=fake_secret()
    )
    _raw_update(other, sealed_secret=key_a.sealed_secret)
    _assert_fails_closed(other, cast.org_a)


def test_a_key_moved_to_another_provider_fails_closed(cast, key_a):
    _raw_update(key_a, provider=Provider.GROQ)
    _assert_fails_closed(key_a, cast.org_a)


@pytest.mark.parametrize(
    "stored",
    ["sk-proj-" + "legacy-plaintext-value", "cf1.9.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA", "garbage", "cf1.1.."],
)
def test_garbage_in_the_column_is_never_passed_through_as_a_key(cast, key_a, stored):
    _raw_update(key_a, sealed_secret=stored)
    _assert_fails_closed(key_a, cast.org_a)


def test_a_keyring_without_the_rows_kid_fails_closed(cast, key_a, settings):
    settings.KEYRING = make_ring(2)
    _assert_fails_closed(key_a, cast.org_a)
    assert _events(AuditEvent.KEY_DECRYPT_FAILED).get().metadata["kid"] == 1


def test_a_retired_kid_fails_closed_and_the_audit_says_retired(cast, key_a, settings):
    settings.KEYRING = make_ring(2, 1, min_kid=2)
    _assert_fails_closed(key_a, cast.org_a)
    metadata = _events(AuditEvent.KEY_DECRYPT_FAILED).get().metadata
    assert metadata["retired_kid"] is True
    assert metadata["kid"] == 1


def test_the_decrypt_failure_log_line_carries_no_key_material(cast, key_a, secret_a, caplog):
    _raw_update(key_a, provider=Provider.ANTHROPIC)
    with (
        caplog.at_level("DEBUG"),
        pytest.raises(ProviderKeyDecryptionError),
        provider_key_open(key=key_a, purpose="run"),
    ):
        pass
    assert "could not be decrypted" in caplog.text
    assert secret_a not in caplog.text
    assert key_a.sealed_secret.split(".")[3] not in caplog.text


@pytest.mark.django_db(transaction=True)
async def test_async_open_works_from_an_event_loop(settings):
    from asgiref.sync import sync_to_async

    from orgs.models import Organization

    settings.KEYRING = make_ring(1)
    secret = fake_secret()
    org = await Organization.objects.acreate(name="Async", slug="async")
    key = await sync_to_async(provider_key_create)(
        org=org, actor=None, provider=Provider.ANTHROPIC, label="a", secret=secret
    )
    try:
        async with aprovider_key_open(key=key, purpose="completion", reference="req-1") as opened:
            assert opened.reveal() == secret
        assert opened.dropped
        assert await AuditEvent.objects.filter(event=AuditEvent.KEY_USED, org=org).acount() == 1
    finally:
        # The ORM ran in asgiref's worker thread: close that thread's connection so the test database can be
        # dropped at the end of the session.
        await sync_to_async(connections.close_all)()


# --- Check outcome, revoke, disable all -----------------------------------------------------------------------


def test_record_check_sets_status_and_audits(cast, key_a):
    provider_key_record_check(key=key_a, actor=cast.admin_a.user, status=KeyStatus.VALID)
    key_a.refresh_from_db()
    assert key_a.status == KeyStatus.VALID
    assert key_a.last_checked_at is not None
    event = _events(AuditEvent.KEY_CHECKED, cast.org_a).get()
    assert (event.metadata["from"], event.metadata["to"]) == ("unchecked", "valid")
    with pytest.raises(ValueError, match="check outcome"):
        provider_key_record_check(key=key_a, actor=None, status=KeyStatus.REVOKED)


def test_revoke_wipes_the_ciphertext_keeps_the_row_and_audits_once(cast, key_a):
    provider_key_revoke(key=key_a, actor=cast.admin_a.user)
    provider_key_revoke(key=key_a, actor=cast.admin_a.user)
    row = ProviderKey.objects.get(pk=key_a.pk)
    assert (row.status, row.sealed_secret, row.kid) == (KeyStatus.REVOKED, "", None)
    assert row.revoked_at is not None
    assert row.last_four == key_a.last_four  # still identifiable in the list and the audit trail
    assert _events(AuditEvent.KEY_REVOKED, cast.org_a).count() == 1


def test_revoked_keys_cannot_be_checked(cast, key_a):
    provider_key_revoke(key=key_a, actor=cast.admin_a.user)
    with pytest.raises(ProviderKeyUnavailable):
        provider_key_record_check(key=key_a, actor=None, status=KeyStatus.VALID)


def test_disable_all_revokes_every_key_of_the_org_only_with_one_event(cast, key_a, key_b):
    provider_key_create(
        org=cast.org_a, actor=cast.admin_a.user, provider=Provider.ANTHROPIC, label="b", secret=fake_secret("sk-ant-")
    )
    count = provider_keys_disable_all(org=cast.org_a, actor=cast.admin_a.user)
    assert count == 2
    assert set(ProviderKey.objects.filter(org=cast.org_a).values_list("status", "sealed_secret")) == {
        (KeyStatus.REVOKED, "")
    }
    assert ProviderKey.objects.get(pk=key_b.pk).status == KeyStatus.UNCHECKED
    event = _events(AuditEvent.KEYS_DISABLED_ALL, cast.org_a).get()
    assert event.metadata["count"] == 2
    assert not _events(AuditEvent.KEY_REVOKED).exists()
    with pytest.raises(ProviderKeyUnavailable), provider_key_open(key=key_a, purpose="run"):
        pass


def test_the_database_refuses_a_live_row_without_ciphertext(cast, key_a):
    from django.db import IntegrityError, transaction

    with pytest.raises(IntegrityError), transaction.atomic():
        _raw_update(key_a, sealed_secret="")


def test_deleting_an_org_deletes_its_keys(cast, key_a):
    cast.org_a.delete()
    assert not ProviderKey.objects.filter(pk=key_a.pk).exists()


def test_services_module_reads_the_keyring_at_call_time(cast, settings):
    settings.KEYRING = make_ring(4)
    key = provider_key_create(org=cast.org_a, actor=None, provider=Provider.OPENAI, label="late", secret=fake_secret())
    assert key.kid == 4


def test_last_used_moves_at_most_once_a_minute_while_every_opening_is_audited(key_a):
    from datetime import timedelta

    from django.utils import timezone
    from freezegun import freeze_time

    start = timezone.now()
    with freeze_time(start):
        with provider_key_open(key=key_a, purpose="test"):
            pass
        first = ProviderKey.objects.get(pk=key_a.pk).last_used_at
    assert first is not None
    with freeze_time(start + timedelta(seconds=30)), provider_key_open(key=key_a, purpose="test"):
        pass
    assert ProviderKey.objects.get(pk=key_a.pk).last_used_at == first
    with freeze_time(start + timedelta(seconds=61)), provider_key_open(key=key_a, purpose="test"):
        pass
    later = ProviderKey.objects.get(pk=key_a.pk).last_used_at
    assert later is not None
    assert later > first
    assert AuditEvent.objects.filter(event=AuditEvent.KEY_USED, target_id=str(key_a.pk)).count() == 3


def test_stale_copies_of_a_key_row_move_last_used_once_a_minute(cast, key_a):
    """The gateway records uses on rows from its cache, whose last_used_at is as old as the entry: the process
    remembers its own moves, so a stale copy sends no UPDATE within the minute; the audit row is still per use."""
    from datetime import timedelta

    from django.utils import timezone
    from freezegun import freeze_time

    start = timezone.now()

    def stale_copy() -> ProviderKey:
        copy = ProviderKey.objects.select_related("org").get(pk=key_a.pk)
        copy.last_used_at = None  # as cached before any use
        return copy

    def updates_sent() -> int:
        with CaptureQueriesContext(connection) as queries:
            provider_key_record_use(key=stale_copy(), actor=cast.admin_a.user, purpose="completion")
        return sum('UPDATE "keys_providerkey"' in q["sql"] for q in queries.captured_queries)

    with freeze_time(start):
        assert updates_sent() == 1
    with freeze_time(start + timedelta(seconds=30)):
        assert updates_sent() == 0
    with freeze_time(start + timedelta(seconds=61)):
        assert updates_sent() == 1
    assert ProviderKey.objects.get(pk=key_a.pk).last_used_at == start + timedelta(seconds=61)
    assert AuditEvent.objects.filter(event=AuditEvent.KEY_USED, target_id=str(key_a.pk)).count() == 3
