"""Keys sealed before the destination joined the AAD (version 1) are re-sealed by migration ``keys.0003`` and by
``keys_rewrap``: row by row, idempotent, failures left alone and audited; and they are never used for a call as they
are (issue #14 point 4)."""

from __future__ import annotations

import importlib
from io import StringIO

import pytest
from django.apps import apps as django_apps
from django.core.checks import run_checks
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from keys.checks import check_provider_key_aad
from keys.crypto import (
    Keyring,
    open_sealed,
    provider_key_aad,
    provider_key_aad_v1,
    seal,
    stored_kid,
)
from keys.models import Provider, ProviderKey
from keys.providers import provider_destination
from keys.services import ProviderKeyDecryptionError, provider_key_create, provider_key_open, provider_key_revoke
from runs.models import AuditEvent
from tests.keys.conftest import fake_secret, make_ring

pytestmark = pytest.mark.django_db

MIGRATION = "0003_reseal_provider_keys_with_destination"


def _migration_operation():
    module = importlib.import_module(f"keys.migrations.{MIGRATION}")
    (operation,) = module.Migration.operations
    return module.Migration, operation


def _forward() -> None:
    _migration_operation()[1].code(django_apps, None)


def _backward() -> None:
    _migration_operation()[1].reverse_code(django_apps, None)


def _old_key(cast, ring: Keyring, *, label: str, base_url: str = "", org=None) -> tuple[ProviderKey, str]:
    """A key as the previous release stored it: sealed with the version 1 AAD (org, id, provider only)."""
    org = org or cast.org_a
    secret = fake_secret()
    key = provider_key_create(
        org=org, actor=None, provider=Provider.OPENAI, label=label, secret=fake_secret(), base_url=base_url
    )
    sealed = seal(ring, secret, provider_key_aad_v1(org_id=key.org_id, key_id=key.pk, provider=key.provider))
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE keys_providerkey SET sealed_secret = %s, aad_version = 1 WHERE id = %s", [sealed, key.pk]
        )
    return ProviderKey.objects.get(pk=key.pk), secret


def _opens(key_id) -> str | None:
    try:
        with provider_key_open(key=ProviderKey.objects.get(pk=key_id), purpose="test") as secret:
            return secret.reveal()
    except ProviderKeyDecryptionError:
        return None


def _bound_to_destination(row: ProviderKey, ring: Keyring) -> str:
    """Opens the stored value with the current AAD computed here, independently of the service."""
    aad = provider_key_aad(
        org_id=row.org_id,
        key_id=row.pk,
        provider=row.provider,
        destination=provider_destination(row.provider, row.base_url),
    )
    return open_sealed(ring, row.sealed_secret, aad)


def test_a_key_on_the_old_aad_is_never_used_for_a_call(cast, ring1):
    key, _secret = _old_key(cast, ring1, label="old")
    assert _opens(key.pk) is None
    failure = AuditEvent.objects.get(event=AuditEvent.KEY_DECRYPT_FAILED, target_id=str(key.pk))
    assert failure.metadata["purpose"] == "test"


def test_the_migration_reseals_old_keys_idempotently_and_leaves_failures_alone(cast, ring1):
    old, secret = _old_key(cast, ring1, label="old", base_url="https://localhost/v1")
    old_b, secret_b = _old_key(cast, ring1, label="old-b", org=cast.org_b)
    current = provider_key_create(org=cast.org_a, actor=None, provider=Provider.GROQ, label="new", secret="gsk_x" * 4)
    # A version 1 value that is not this row's (copied from another org's row): it must not be made to fit.
    broken, _ = _old_key(cast, ring1, label="broken")
    foreign = seal(ring1, "sk-foreign", provider_key_aad_v1(org_id=cast.org_b.id, key_id=broken.pk, provider="openai"))
    ProviderKey.objects.filter(pk=broken.pk).update(sealed_secret=foreign)
    revoked, _ = _old_key(cast, ring1, label="revoked")
    provider_key_revoke(key=revoked, actor=None)
    before = dict(ProviderKey.objects.values_list("pk", "sealed_secret"))
    assert [m.id for m in check_provider_key_aad()] == ["keys.W002"]

    migration, _ = _migration_operation()
    assert migration.atomic is False  # one transaction per row, so an interrupted migrate resumes
    _forward()

    for key, plaintext in ((old, secret), (old_b, secret_b)):
        row = ProviderKey.objects.get(pk=key.pk)
        assert (row.aad_version, row.kid) == (2, 1)
        assert row.sealed_secret != before[key.pk]
        assert _bound_to_destination(row, ring1) == plaintext
        assert _opens(key.pk) == plaintext
    assert ProviderKey.objects.get(pk=current.pk).sealed_secret == before[current.pk]  # already current: untouched
    # The failure: left exactly as it was, audited, and still flagged by the system check.
    row = ProviderKey.objects.get(pk=broken.pk)
    assert (row.sealed_secret, row.aad_version) == (foreign, 1)
    failure = AuditEvent.objects.get(event=AuditEvent.KEY_DECRYPT_FAILED, target_id=str(broken.pk))
    assert failure.metadata["purpose"] == "reseal"
    assert "sk-foreign" not in str(failure.metadata)
    assert [m.id for m in check_provider_key_aad()] == ["keys.W002"]
    summary = AuditEvent.objects.get(event=AuditEvent.KEY_REWRAPPED, org=None)
    assert (summary.metadata["rewrapped"], summary.metadata["failed"]) == (2, 1)

    # Idempotent: a second run changes nothing that was done, and tries the failure again (audited again).
    done = dict(ProviderKey.objects.exclude(pk=broken.pk).values_list("pk", "sealed_secret"))
    _forward()
    assert dict(ProviderKey.objects.exclude(pk=broken.pk).values_list("pk", "sealed_secret")) == done
    assert AuditEvent.objects.filter(event=AuditEvent.KEY_DECRYPT_FAILED, target_id=str(broken.pk)).count() == 2
    assert ProviderKey.objects.get(pk=revoked.pk).sealed_secret == ""


def test_the_migration_reverses_to_keys_the_previous_release_can_open(cast, ring1):
    key, secret = _old_key(cast, ring1, label="old")
    _forward()
    assert ProviderKey.objects.get(pk=key.pk).aad_version == 2

    _backward()
    row = ProviderKey.objects.get(pk=key.pk)
    assert row.aad_version == 1
    v1 = provider_key_aad_v1(org_id=row.org_id, key_id=row.pk, provider=row.provider)
    assert open_sealed(ring1, row.sealed_secret, v1) == secret

    _forward()
    assert _opens(key.pk) == secret


@pytest.mark.django_db(transaction=True)
def test_migrating_keys_backward_and_forward_keeps_every_key_usable(cast, settings):
    """The real migration plumbing, on a real schema: 0003 back to 0001 (the column goes) and forward again."""
    settings.KEYRING = make_ring(1)
    org = cast.org_a
    secret = fake_secret()
    key = provider_key_create(org=org, actor=None, provider=Provider.OPENAI, label="m", secret=secret)
    try:
        call_command("migrate", "keys", "0002", skip_checks=True, verbosity=0)
        with connection.cursor() as cursor:
            cursor.execute("SELECT sealed_secret, aad_version FROM keys_providerkey WHERE id = %s", [key.pk])
            sealed, version = cursor.fetchone()
        assert version == 1
        v1 = provider_key_aad_v1(org_id=org.id, key_id=key.pk, provider="openai")
        assert open_sealed(settings.KEYRING, sealed, v1) == secret
        call_command("migrate", "keys", "0001", skip_checks=True, verbosity=0)
    finally:
        call_command("migrate", "keys", skip_checks=True, verbosity=0)
    executor = MigrationExecutor(connection)
    assert ("keys", MIGRATION) in executor.loader.applied_migrations
    assert ProviderKey.objects.get(pk=key.pk).aad_version == 2
    assert _opens(key.pk) == secret


# --- keys_rewrap ----------------------------------------------------------------------------------------------------


def _rewrap() -> str:
    out = StringIO()
    call_command("keys_rewrap", stdout=out, stderr=StringIO())
    return out.getvalue()


def test_keys_rewrap_writes_every_key_under_the_current_aad(cast, settings):
    settings.KEYRING = ring1 = make_ring(1)
    old, old_secret = _old_key(cast, ring1, label="old", base_url="https://localhost/v1")
    fresh_secret = fake_secret()
    fresh = provider_key_create(org=cast.org_b, actor=None, provider=Provider.OPENAI, label="f", secret=fresh_secret)

    settings.KEYRING = ring = make_ring(2, 1)
    assert "2 provider key(s) to re-seal" in _rewrap()

    for key, secret in ((old, old_secret), (fresh, fresh_secret)):
        row = ProviderKey.objects.get(pk=key.pk)
        assert (row.kid, row.aad_version, stored_kid(row.sealed_secret)) == (2, 2, 2)
        assert _bound_to_destination(row, ring) == secret
        assert _opens(key.pk) == secret
    # And the binding holds: the rewrapped key does not follow a changed destination.
    ProviderKey.objects.filter(pk=old.pk).update(base_url="https://localhost/v2")
    assert _opens(old.pk) is None


def test_keys_rewrap_reseals_an_old_aad_key_already_on_the_primary_kid(cast, ring1):
    key, secret = _old_key(cast, ring1, label="old")
    output = _rewrap()
    assert "1 provider key(s) to re-seal" in output
    assert "Done: 1 re-sealed under kid 1" in output
    assert ProviderKey.objects.get(pk=key.pk).aad_version == 2
    assert _opens(key.pk) == secret
    assert "0 provider key(s) to re-seal" in _rewrap()  # and then it is done


def test_the_system_check_warns_while_old_aad_keys_remain(cast, ring1):
    assert "keys.W002" not in {m.id for m in run_checks(tags=["keys"], databases=["default"])}
    _old_key(cast, ring1, label="old")
    warning = next(m for m in run_checks(tags=["keys"], databases=["default"]) if m.id == "keys.W002")
    assert "1 provider key sealed with an older associated data" in warning.msg
    assert not warning.is_serious()  # migrate runs the checks, and migrate is what fixes it
    _forward()
    assert "keys.W002" not in {m.id for m in run_checks(tags=["keys"], databases=["default"])}
