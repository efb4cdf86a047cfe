"""Key rotation: keys_rewrap across two kids, CESAFLOW_KEYRING_MIN_KID, and the keyring system checks
(issue #3 points 2 and 7; security.md §9 test 4)."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from keys import services
from keys.checks import check_keyring_config, check_stored_kids
from keys.crypto import Keyring, stored_kid
from keys.models import Provider, ProviderKey
from keys.services import ProviderKeyDecryptionError, provider_key_create, provider_key_open, provider_key_revoke
from runs.models import AuditEvent
from tests.keys.conftest import fake_secret, make_ring

pytestmark = pytest.mark.django_db


def _make_keys(cast, n: int, prefix: str) -> dict[str, str]:
    """``n`` keys spread over both orgs; returns {key id: secret}."""
    made = {}
    for i in range(n):
        org, admin = (cast.org_a, cast.admin_a) if i % 2 == 0 else (cast.org_b, cast.admin_b)
        secret = fake_secret()
        key = provider_key_create(
            org=org, actor=admin.user, provider=Provider.OPENAI, label=f"{prefix}-{i}", secret=secret
        )
        made[str(key.id)] = secret
    return made


def _opened(key_id: str) -> str:
    with provider_key_open(key=ProviderKey.objects.get(pk=key_id), purpose="test") as secret:
        return secret.reveal()


def _rewrap(*args: str) -> str:
    out = StringIO()
    call_command("keys_rewrap", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def test_rotation_round_trip_across_two_kids(cast, settings):
    # 1. Ring {1}: write rows.
    settings.KEYRING = make_ring(1)
    old = _make_keys(cast, 4, "old")
    revoked = provider_key_create(
        org=cast.org_a, actor=None, provider=Provider.GROQ, label="gone", secret=fake_secret("gsk_")
    )
    provider_key_revoke(key=revoked, actor=None)
    leftover = {k: ProviderKey.objects.get(pk=k).sealed_secret for k in old}

    # 2. Add kid 2 (not primary yet), deploy: everything still opens and new rows still use kid 1.
    settings.KEYRING = make_ring(1, 2)
    assert all(_opened(k) == s for k, s in old.items())

    # 3. Promote kid 2: old rows still open, new rows carry kid 2.
    settings.KEYRING = make_ring(2, 1)
    assert all(_opened(k) == s for k, s in old.items())
    new = _make_keys(cast, 2, "new")
    assert {ProviderKey.objects.get(pk=k).kid for k in new} == {2}

    # 4. Rewrap: every live row moves to kid 2, revoked rows stay empty.
    output = _rewrap()
    assert "4 provider key(s) to re-seal" in output
    assert "Done: 4 re-sealed under kid 2, 0 already done, 0 failed." in output
    assert set(ProviderKey.objects.exclude(pk=revoked.pk).values_list("kid", flat=True)) == {2}
    assert ProviderKey.objects.get(pk=revoked.pk).sealed_secret == ""
    for row in ProviderKey.objects.exclude(pk=revoked.pk):
        assert stored_kid(row.sealed_secret) == 2

    # 5. Idempotent: nothing left to do, nothing changes.
    before = dict(ProviderKey.objects.values_list("id", "sealed_secret"))
    assert "0 provider key(s) to re-seal" in _rewrap()
    assert dict(ProviderKey.objects.values_list("id", "sealed_secret")) == before

    # 6. MIN_KID=2: every row opens; a leftover kid-1 value (a backup, a missed row) fails closed as "retired".
    settings.KEYRING = make_ring(2, 1, min_kid=2)
    assert all(_opened(k) == s for k, s in {**old, **new}.items())
    victim = next(iter(old))
    ProviderKey.objects.filter(pk=victim).update(sealed_secret=leftover[victim], kid=1)
    with pytest.raises(ProviderKeyDecryptionError):
        _opened(victim)
    failure = AuditEvent.objects.get(event=AuditEvent.KEY_DECRYPT_FAILED)
    assert failure.metadata["retired_kid"] is True

    # 7. Retire kid 1 entirely: the re-sealed rows never needed it.
    settings.KEYRING = make_ring(2)
    assert all(_opened(k) == s for k, s in {**old, **new}.items() if k != victim)


def test_rewrap_records_a_summary_per_org_and_one_for_the_installation(cast, settings):
    settings.KEYRING = make_ring(1)
    _make_keys(cast, 3, "k")  # two in org A, one in org B
    settings.KEYRING = make_ring(2, 1)
    _rewrap()
    events = AuditEvent.objects.filter(event=AuditEvent.KEY_REWRAPPED)
    by_org = {e.org_id: e.metadata for e in events}
    assert by_org[cast.org_a.id] == {"to_kid": 2, "from_kids": [1], "rewrapped": 2, "failed": 0}
    assert by_org[cast.org_b.id] == {"to_kid": 2, "from_kids": [1], "rewrapped": 1, "failed": 0}
    assert by_org[None] == {"to_kid": 2, "from_kids": [1], "rewrapped": 3, "failed": 0}
    assert events.count() == 3


def test_rewrap_is_resumable_after_an_interruption(cast, settings):
    settings.KEYRING = make_ring(1)
    made = _make_keys(cast, 5, "k")
    settings.KEYRING = make_ring(2, 1)
    # An interrupted run: it got through two rows (each committed on its own) and died.
    assert "Done: 2 re-sealed" in _rewrap("--limit", "2")
    assert ProviderKey.objects.filter(kid=1).count() == 3
    # The rerun picks up exactly the rows still on kid 1.
    assert "3 provider key(s) to re-seal" in _rewrap()
    assert set(ProviderKey.objects.values_list("kid", flat=True)) == {2}
    assert all(_opened(k) == s for k, s in made.items())


def test_rewrap_dry_run_changes_nothing(cast, settings):
    settings.KEYRING = make_ring(1)
    _make_keys(cast, 2, "k")
    settings.KEYRING = make_ring(2, 1)
    assert "2 provider key(s) to re-seal" in _rewrap("--dry-run")
    assert set(ProviderKey.objects.values_list("kid", flat=True)) == {1}
    assert not AuditEvent.objects.filter(event=AuditEvent.KEY_REWRAPPED).exists()


def test_a_row_that_cannot_be_opened_is_left_alone_counted_and_audited(cast, settings):
    settings.KEYRING = make_ring(1)
    made = _make_keys(cast, 2, "k")
    broken, fine = list(made)
    ProviderKey.objects.filter(pk=broken).update(provider=Provider.GROQ)  # AAD no longer matches
    before = ProviderKey.objects.get(pk=broken).sealed_secret
    settings.KEYRING = make_ring(2, 1)
    with pytest.raises(CommandError, match="1 provider key"):
        _rewrap()
    assert ProviderKey.objects.get(pk=broken).sealed_secret == before
    assert ProviderKey.objects.get(pk=broken).kid == 1
    assert ProviderKey.objects.get(pk=fine).kid == 2
    assert AuditEvent.objects.filter(event=AuditEvent.KEY_DECRYPT_FAILED, target_id=broken).count() == 1
    summary = AuditEvent.objects.get(event=AuditEvent.KEY_REWRAPPED, org=None)
    assert (summary.metadata["rewrapped"], summary.metadata["failed"]) == (1, 1)


def test_rewrap_of_one_row_skips_rows_already_on_the_primary(cast, settings):
    settings.KEYRING = make_ring(2, 1)
    key = provider_key_create(org=cast.org_a, actor=None, provider=Provider.OPENAI, label="x", secret=fake_secret())
    assert services.provider_key_rewrap(key_id=key.id) is False


# --- System checks ---------------------------------------------------------------------------------------------


def test_check_reports_the_number_of_keys_a_keyring_cannot_read(cast, settings):
    settings.KEYRING = make_ring(1)
    _make_keys(cast, 3, "k")
    settings.KEYRING = make_ring(2)
    _make_keys(cast, 1, "new")
    settings.KEYRING = make_ring(3)  # lacks both stored kids
    errors = [m for m in check_stored_kids(databases=["default"]) if m.id == "keys.E004"]
    assert len(errors) == 1
    assert errors[0].msg.startswith("4 stored secrets cannot be decrypted")
    assert "kid 1, 2" in errors[0].msg
    assert errors[0].is_serious()


def test_check_runs_through_the_check_framework(cast, settings):
    settings.KEYRING = make_ring(1)
    _make_keys(cast, 1, "k")
    settings.KEYRING = make_ring(2)
    messages = run_checks(tags=["keys"])
    assert [m.id for m in messages] == ["keys.E004"]
    assert "1 stored secret cannot be decrypted" in messages[0].msg


def test_check_reports_keys_below_min_kid_and_warns_about_stale_kids(cast, settings):
    settings.KEYRING = make_ring(1)
    _make_keys(cast, 2, "k")
    settings.KEYRING = make_ring(2, 1)
    assert [m.id for m in check_stored_kids()] == ["keys.W001"]
    settings.KEYRING = make_ring(3, 2, 1, min_kid=2)
    messages = check_stored_kids()
    assert [m.id for m in messages] == ["keys.E005"]
    assert messages[0].msg.startswith("2 stored secrets cannot be decrypted")


def test_check_is_quiet_when_every_key_is_on_the_primary(cast, key_a):
    assert check_stored_kids() == []
    assert check_keyring_config() == []


def test_check_does_not_crash_before_migrate(cast, key_a, settings):
    settings.KEYRING = make_ring(2)
    with connection.cursor() as cursor:  # rolled back with the test's transaction
        cursor.execute("ALTER TABLE keys_providerkey RENAME TO keys_providerkey_not_yet")
    assert check_stored_kids() == []


def test_check_flags_a_primary_below_min_kid_and_a_keyring_derived_from_secret_key(settings):
    import base64
    import hashlib

    ring = make_ring(1, 2)
    settings.KEYRING = Keyring(keys=ring.keys, primary_kid=1, min_kid=2)  # what parse() would have refused
    assert [m.id for m in check_keyring_config()] == ["keys.E002"]
    derived = base64.b64encode(hashlib.sha256(settings.SECRET_KEY.encode()).digest()).decode()
    settings.KEYRING = Keyring.parse(f"1:{derived}")
    assert [m.id for m in check_keyring_config()] == ["keys.E003"]
    settings.KEYRING = None
    assert [m.id for m in check_keyring_config()] == ["keys.E001"]


def test_rotation_covers_operators_totp_and_projects_webhook_secrets(cast, settings):
    """Other values sealed with the keyring (keys.sealed) move to the new kid with the provider keys, and the check
    counts them: retiring a kid they still need is refused, not discovered when an operator cannot sign in."""
    from nexus.models import Operator
    from nexus.totp import totp_generate_secret, totp_open, totp_seal
    from runs.models import Project
    from runs.webhooks.secrets import webhook_secret_generate, webhook_secret_open, webhook_secret_seal

    settings.KEYRING = make_ring(1)
    operator = Operator.objects.create(email="ops@ops.example")
    totp = totp_generate_secret()
    Operator.objects.filter(pk=operator.pk).update(totp_sealed=totp_seal(secret=totp, operator_id=operator.pk))
    project = Project.objects.create(org=cast.org_a, name="hooked")
    hook = webhook_secret_generate()
    sealed = webhook_secret_seal(org_id=cast.org_a.id, project_id=project.id, secret=hook)
    Project.objects.filter(pk=project.pk).update(github_secret_sealed=sealed)

    settings.KEYRING = make_ring(2, 1)
    assert any(message.id == "keys.W001" for message in check_stored_kids())
    output = _rewrap()
    assert "Other sealed values (operator TOTP secrets, project webhook secrets)" in output
    assert "2 re-sealed, 0 failed" in output

    settings.KEYRING = make_ring(2)  # kid 1 retired: both still open
    operator.refresh_from_db()
    project.refresh_from_db()
    assert stored_kid(operator.totp_sealed) == 2
    assert totp_open(sealed=operator.totp_sealed, operator_id=operator.pk) == totp
    opened = webhook_secret_open(org_id=cast.org_a.id, project_id=project.id, sealed=project.github_secret_sealed)
    assert opened.reveal() == hook.reveal()
    assert check_stored_kids() == []

    # A value left on a kid the ring lacks is an error before anyone is locked out.
    Operator.objects.filter(pk=operator.pk).update(totp_sealed=totp_seal(secret=totp, operator_id=operator.pk))
    settings.KEYRING = make_ring(3)
    assert [message.id for message in check_stored_kids()] == ["keys.E004"]
