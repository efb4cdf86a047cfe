"""Self-hoster commands: create_org and create_api_key."""

from __future__ import annotations

import io
import sys
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone
from rest_framework.test import APIClient

from orgs.models import ApiKey, Membership, Organization, Role, User
from orgs.permissions import DEFAULT_API_KEY_SCOPES
from orgs.tokens import API_KEY_RE
from runs.models import AuditEvent

pytestmark = pytest.mark.django_db

PASSWORD = "a long enough passphrase 77"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(name: str, *args: str) -> str:
    out = io.StringIO()
    call_command(name, *args, stdout=out)
    return out.getvalue()


# --- create_org -------------------------------------------------------------------------------------


def test_create_org_reads_the_password_from_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
    output = _run("create_org", "--name", "Acme Labs", "--admin-email", "Ops@Acme.example")
    org = Organization.objects.get(slug="acme-labs")
    user = User.objects.get(email="ops@acme.example")
    assert user.check_password(PASSWORD)
    assert Membership.objects.get(user=user, org=org).role == Role.ADMIN
    assert PASSWORD not in output
    assert "acme-labs" in output


def test_create_org_generates_and_prints_a_password_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stdin", _Terminal())
    output = _run("create_org", "--name", "Gen", "--admin-email", "gen@example.com", "--slug", "gen-org")
    printed = output.strip().splitlines()[-1].rsplit(" ", 1)[-1]
    assert len(printed) >= 20
    assert User.objects.get(email="gen@example.com").check_password(printed)
    assert Organization.objects.filter(slug="gen-org").exists()


def test_create_org_makes_an_existing_user_admin_without_touching_their_password(cast, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("ignored\n"))
    output = _run("create_org", "--name", "Second", "--admin-email", "dave@a.example")
    org = Organization.objects.get(name="Second")
    assert Membership.objects.get(user=cast.dev_a.user, org=org).role == Role.ADMIN
    assert "already had an account" in output
    assert not User.objects.get(pk=cast.dev_a.user.pk).check_password("ignored")


def test_create_org_refuses_a_weak_password_and_creates_nothing(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    with pytest.raises(CommandError):
        _run("create_org", "--name", "Weak", "--admin-email", "weak@example.com")
    assert not User.objects.filter(email="weak@example.com").exists()
    assert not Organization.objects.filter(name="Weak").exists()


def test_create_org_refuses_a_taken_slug(cast, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
    with pytest.raises(CommandError, match="taken"):
        _run("create_org", "--name", "Clash", "--admin-email", "clash@example.com", "--slug", "org-a")
    assert not User.objects.filter(email="clash@example.com").exists()


# --- create_api_key ---------------------------------------------------------------------------------


def test_create_api_key_prints_the_key_alone_on_the_last_line_and_it_works(cast):
    output = _run("create_api_key", "--org", "org-b", "--name", "deploy bot")
    last = output.rstrip("\n").splitlines()[-1]
    assert API_KEY_RE.match(last)
    assert output.count(last) == 1
    api_key = ApiKey.objects.get(org=cast.org_b, name="deploy bot")
    assert set(api_key.scopes) == DEFAULT_API_KEY_SCOPES
    assert api_key.expires_at is None

    client = APIClient()
    client.credentials(HTTP_X_API_KEY=last)
    response = client.get("/api/v1/org")
    assert response.status_code == 200
    assert response.json() == {
        "id": str(cast.org_b.id),
        "slug": "org-b",
        "name": "Org B",
        "created_at": cast.org_b.created_at.isoformat().replace("+00:00", "Z"),
    }
    event = AuditEvent.objects.get(event=AuditEvent.API_KEY_CREATED, target_id=str(api_key.id))
    assert event.org_id == cast.org_b.id
    assert event.actor_kind == "system"
    assert last not in str(event.metadata)


def test_create_api_key_with_scopes_and_expiry(cast):
    output = _run(
        "create_api_key",
        "--org",
        "org-a",
        "--name",
        "auditor",
        "--scopes",
        "audit:read,org:read",
        "--expires-days",
        "7",
    )
    secret = output.strip().splitlines()[-1]
    api_key = ApiKey.objects.get(name="auditor")
    assert api_key.scopes == ["audit:read", "org:read"]
    assert api_key.expires_at is not None
    assert abs(api_key.expires_at - (timezone.now() + timedelta(days=7))) < timedelta(minutes=1)
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=secret)
    assert client.get("/api/v1/audit-events").status_code == 200
    assert client.get("/api/v1/members").status_code == 403


def test_create_api_key_accepts_space_separated_scopes(cast):
    _run("create_api_key", "--org", "org-a", "--name", "two", "--scopes", "org:read", "members:read")
    assert ApiKey.objects.get(name="two").scopes == ["members:read", "org:read"]


@pytest.mark.parametrize(
    "args",
    [
        ["--org", "no-such-org", "--name", "x"],
        ["--org", "org-a", "--name", "x", "--scopes", "root"],
        ["--org", "org-a", "--name", "x", "--expires-days", "0"],
        ["--org", "org-a", "--name", "   "],
    ],
)
def test_create_api_key_bad_input_is_a_command_error(cast, args):
    before = ApiKey.objects.count()
    with pytest.raises(CommandError):
        _run("create_api_key", *args)
    assert ApiKey.objects.count() == before
