"""Session tokens (issue #11 point 1-2): short-lived JWTs checked against a live session record on every request,
silent refresh while the session lives, fail-closed without the store, and the person's own control over their
sessions. Real Redis (a throwaway server is stopped and restarted for the fail-closed test), real middleware."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
from datetime import timedelta
from typing import Any

import jwt
import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse
from freezegun import freeze_time

from keys.crypto import Keyring
from orgs.api.base import OrgAPIView
from orgs.mixins import OrgViewMixin
from orgs.permissions import ORG_READ
from orgs.sessions.store import LocalSessionStore, SessionRecord, session_key, session_store
from orgs.sessions.tokens import AUDIENCE, ISSUER, TOKEN_TYPE, token_decode
from runs.models import AuditEvent
from tests.conftest import PASSWORD
from tests.signin import session_cookies_for, session_of

API = "/api/v1/org"
ACCESS = settings.SESSION_COOKIE_NAME
REFRESH = settings.SESSION_REFRESH_COOKIE_NAME


def _client(cookies: dict[str, str]) -> Client:
    client = Client()
    for name, value in cookies.items():
        client.cookies[name] = value
    return client


def _signed(payload: dict[str, object], *, key: bytes | None = None, headers: dict[str, str] | None = None) -> str:
    keyring = settings.SESSION_KEYRING
    return jwt.encode(
        payload,
        key if key is not None else keyring.keys[keyring.primary_kid],
        algorithm="HS256",
        headers=headers if headers is not None else {"kid": str(keyring.primary_kid), "typ": TOKEN_TYPE},
    )


def _claims(cookies: dict[str, str]) -> dict[str, object]:
    claims = token_decode(cookies[ACCESS])
    now = int(time.time())
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": claims.sub,
        "sid": claims.sid,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "x1",
    }


def _alg_none(payload: dict[str, object]) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': TOKEN_TYPE, 'kid': '1'})}.{part(payload)}."


# --- The token ------------------------------------------------------------------------------------------------------


def test_signing_in_sets_two_httponly_lax_cookies_and_the_token_holds_nothing_secret(cast):
    client = Client()
    response = client.post(reverse("orgs:login"), {"email": "alice@a.example", "password": PASSWORD})
    assert response.status_code == 302
    for name in (ACCESS, REFRESH):
        morsel = response.cookies[name]
        assert morsel["httponly"]
        assert morsel["samesite"] == "Lax"
        assert morsel["path"] == "/"
        assert 0 < int(morsel["max-age"]) <= settings.SESSION_ABSOLUTE_SECONDS
    token = response.cookies[ACCESS].value
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    assert header["typ"] == TOKEN_TYPE
    assert header["kid"] == str(settings.SESSION_KEYRING.primary_kid)
    payload = jwt.decode(token, options={"verify_signature": False})
    assert set(payload) == {"iss", "aud", "sub", "sid", "iat", "nbf", "exp", "jti"}
    assert payload["exp"] - payload["iat"] <= 900
    assert payload["sub"] == str(cast.admin_a.user.pk)
    # The store knows the session by a hash of its id only.
    record = session_of(client)
    assert record is not None
    assert record.key == session_key(payload["sid"])
    raw = b" ".join(session_store()._client().keys("*"))  # type: ignore[attr-defined]
    assert payload["sid"].encode() not in raw


def test_secure_cookies_when_configured(cast, settings):
    settings.SESSION_COOKIE_SECURE = True
    response = Client().post(reverse("orgs:login"), {"email": "alice@a.example", "password": PASSWORD})
    assert response.cookies[ACCESS]["secure"]
    assert response.cookies[REFRESH]["secure"]


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda c: c[ACCESS][:-3] + ("AAA" if not c[ACCESS].endswith("AAA") else "BBB"), id="tampered"),
        pytest.param(lambda c: _signed({**_claims(c), "sub": "someone-else"}, key=b"x" * 32), id="other-key"),
        pytest.param(lambda c: _alg_none(_claims(c)), id="alg-none"),
        pytest.param(lambda c: _signed(_claims(c), headers={"kid": "99", "typ": TOKEN_TYPE}), id="unknown-kid"),
        pytest.param(
            lambda c: _signed(_claims(c), headers={"kid": "../../etc/passwd", "typ": TOKEN_TYPE}), id="kid-path"
        ),
        pytest.param(lambda c: _signed(_claims(c), headers={"kid": "1 OR 1=1", "typ": TOKEN_TYPE}), id="kid-sql"),
        pytest.param(lambda c: _signed(_claims(c), headers={"kid": "\u00b2", "typ": TOKEN_TYPE}), id="kid-superscript"),
        pytest.param(lambda c: _signed(_claims(c), headers={"kid": "1", "typ": "JWT"}), id="wrong-typ"),
        pytest.param(lambda c: _signed(_claims(c), headers={"kid": "1"}), id="missing-typ"),
        pytest.param(lambda c: _signed({**_claims(c), "aud": "cesaflow:nexus"}), id="wrong-aud"),
        pytest.param(lambda c: _signed({**_claims(c), "iss": "elsewhere"}), id="wrong-iss"),
        pytest.param(lambda c: _signed({k: v for k, v in _claims(c).items() if k != "jti"}), id="no-jti"),
        pytest.param(lambda c: _signed({k: v for k, v in _claims(c).items() if k != "sid"}), id="no-sid"),
        pytest.param(lambda c: _signed({**_claims(c), "nbf": int(time.time()) + 600}), id="not-yet-valid"),
        pytest.param(lambda c: _signed({**_claims(c), "exp": int(time.time()) - 5}), id="expired"),
        pytest.param(lambda c: _signed(_claims(c), key=settings.SECRET_KEY.encode()), id="secret-key"),
        pytest.param(lambda c: "x" * 5000, id="oversized"),
    ],
)
def test_a_bad_token_is_refused_on_the_api_and_pages_and_its_cookies_are_dropped(cast, forge):
    cookies = session_cookies_for(cast.admin_a.user)
    bad = {ACCESS: forge(cookies)}  # no refresh cookie: nothing may rescue a bad token
    api = _client(bad).get(API)
    assert api.status_code == 401
    assert api.json()["error"]["code"] == "unauthenticated"
    page = _client(bad).get(reverse("orgs:home"))
    assert page.status_code == 302
    assert page["Location"].startswith(reverse("orgs:login"))
    assert page.cookies[ACCESS].value == ""  # deleted
    # The genuine token still works: the refusal was about the forgery, not the session.
    assert _client({ACCESS: cookies[ACCESS]}).get(API).status_code == 200


def test_a_tampered_token_is_not_rescued_by_a_valid_refresh_cookie(cast):
    cookies = session_cookies_for(cast.admin_a.user)
    forged = _signed({**_claims(cookies)}, key=b"y" * 32)
    assert _client({ACCESS: forged, REFRESH: cookies[REFRESH]}).get(API).status_code == 401


def test_after_a_key_rotation_old_tokens_are_renewed_from_the_refresh_cookie(cast, settings):
    cookies = session_cookies_for(cast.dev_a.user)
    new_key = base64.b64encode(b"n" * 32).decode()
    settings.SESSION_KEYRING = Keyring.parse(f"2:{new_key}")  # kid 1 removed
    assert _client({ACCESS: cookies[ACCESS]}).get(API).status_code == 401
    response = _client(cookies).get(API)
    assert response.status_code == 200
    assert jwt.get_unverified_header(response.cookies[ACCESS].value)["kid"] == "2"


def test_a_valid_token_whose_session_is_gone_signs_the_browser_out(cast):
    client = cast.admin_a.client()
    assert client.get(reverse("orgs:home")).status_code == 200
    record = session_of(client)
    assert record is not None
    session_store().delete(record.key, user_id=record.user_id)
    page = client.get(reverse("orgs:home"))
    assert page.status_code == 302
    assert page["Location"].startswith(reverse("orgs:login"))
    assert client.get(API).status_code == 401


def test_a_deactivated_user_is_signed_out_and_the_record_deleted(cast):
    client = cast.dev_a.client()
    record = session_of(client)
    cast.dev_a.user.is_active = False
    cast.dev_a.user.save(update_fields=["is_active"])
    assert client.get(API).status_code == 401
    assert record is not None
    assert session_store().get(record.key) is None


# --- Refresh, idle and absolute expiry --------------------------------------------------------------------------


def test_an_expired_token_is_renewed_silently_while_the_session_lives(cast):
    with freeze_time("2026-11-30 09:00:00") as frozen:
        cookies = session_cookies_for(cast.dev_a.user)
        frozen.tick(timedelta(seconds=settings.SESSION_TOKEN_SECONDS + 60))
        # The access token alone is expired: refused.
        assert _client({ACCESS: cookies[ACCESS]}).get(API).status_code == 401
        # With the refresh cookie, the browser gets a new token and the request succeeds.
        client = _client(cookies)
        response = client.get(API)
        assert response.status_code == 200
        renewed = response.cookies[ACCESS].value
        assert renewed
        assert renewed != cookies[ACCESS]
        old_sid = jwt.decode(cookies[ACCESS], options={"verify_signature": False})["sid"]
        assert token_decode(renewed).sid == old_sid  # the same session, a new token
        assert REFRESH not in response.cookies  # the refresh cookie is not re-issued
        assert client.get(API).status_code == 200


def test_the_session_ends_after_the_idle_timeout(cast):
    with freeze_time("2026-11-30 09:00:00") as frozen:
        client = _client(session_cookies_for(cast.dev_a.user))
        frozen.tick(timedelta(seconds=settings.SESSION_IDLE_SECONDS - 120))
        assert client.get(API).status_code == 200  # activity moves the idle deadline
        frozen.tick(timedelta(seconds=settings.SESSION_IDLE_SECONDS - 120))
        assert client.get(API).status_code == 200
        frozen.tick(timedelta(seconds=settings.SESSION_IDLE_SECONDS + 1))
        assert client.get(API).status_code == 401


def test_the_session_ends_at_the_absolute_deadline_whatever_the_activity(cast):
    with freeze_time("2026-11-30 09:00:00") as frozen:
        client = _client(session_cookies_for(cast.dev_a.user))
        elapsed = 0
        step = settings.SESSION_IDLE_SECONDS // 2
        while elapsed + step < settings.SESSION_ABSOLUTE_SECONDS:
            frozen.tick(timedelta(seconds=step))
            elapsed += step
            assert client.get(API).status_code == 200, elapsed
        frozen.tick(timedelta(seconds=settings.SESSION_ABSOLUTE_SECONDS - elapsed + 1))
        assert client.get(API).status_code == 401


def test_signing_in_again_issues_a_new_session_id_and_kills_the_old_one(cast):
    client = cast.admin_a.client()
    old = session_of(client)
    client.post(reverse("orgs:login"), {"email": "alice@a.example", "password": PASSWORD})
    new = session_of(client)
    assert old is not None
    assert new is not None
    assert new.key != old.key
    assert session_store().get(old.key) is None


# --- Fail closed ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_redis(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("redis-server did not start")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_with_the_session_store_down_signed_in_requests_fail_closed_and_come_back_signed_out(cast, settings):
    port = _free_port()
    server = _start_redis(port)
    try:
        settings.CACHES = {
            **settings.CACHES,
            "sessions": {**settings.CACHES["sessions"], "LOCATION": f"redis://127.0.0.1:{port}/0"},
        }
        client = _client(session_cookies_for(cast.admin_a.user))
        assert client.get(API).status_code == 200
        server.terminate()
        server.wait(timeout=10)
        api = client.get(API)
        assert api.status_code == 503
        assert api.json()["error"]["code"] == "session_store_unavailable"
        assert api["Retry-After"]
        page = client.get(reverse("orgs:home"))
        assert page.status_code == 503
        assert b"cannot check your sign-in" in page.content
        # Requests that present no session go on: an org API key, or the login page itself.
        assert cast.admin_a.api().get(API).status_code == 200
        assert Client().get(reverse("orgs:login")).status_code == 200
        # Redis comes back empty (no persistence): the allowlist has no session, so nobody is let in.
        server = _start_redis(port)
        assert client.get(API).status_code == 401
    finally:
        server.kill()
        server.wait(timeout=10)


# --- The person's control ------------------------------------------------------------------------------------------


def test_sessions_page_lists_each_session_with_device_and_marks_this_one(cast):
    firefox = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0"
    other = Client(HTTP_USER_AGENT=firefox)
    assert other.post(reverse("orgs:login"), {"email": "dave@a.example", "password": PASSWORD}).status_code == 302
    client = cast.dev_a.client()
    page = client.get(reverse("orgs:sessions"))
    assert page.status_code == 200
    html = page.content.decode()
    assert "Firefox on Windows" in html
    assert html.count("This session") == 1
    assert len(page.context["rows"]) == 2


def test_revoking_another_session_signs_that_browser_out_and_is_audited(cast):
    mine = cast.dev_a.client()
    other = cast.dev_a.client()
    target = session_of(other)
    assert target is not None
    response = mine.post(reverse("orgs:session_revoke", args=[target.key]))
    assert response.status_code == 302
    assert other.get(API).status_code == 401
    assert mine.get(API).status_code == 200
    assert AuditEvent.objects.filter(event=AuditEvent.SESSION_REVOKED, actor_user=cast.dev_a.user).exists()


def test_nobody_can_revoke_someone_elses_session(cast):
    victim = cast.admin_a.client()
    target = session_of(victim)
    assert target is not None
    response = cast.dev_a.client().post(reverse("orgs:session_revoke", args=[target.key]))
    assert response.status_code == 404
    assert victim.get(API).status_code == 200
    assert cast.dev_a.client().post(reverse("orgs:session_revoke", args=["nothex"])).status_code == 404


def test_sign_out_everywhere_ends_the_sessions_of_two_separate_clients(cast):
    laptop = cast.dev_a.client()
    phone = cast.dev_a.client()
    colleague = cast.admin_a.client()
    response = laptop.post(reverse("orgs:sign_out_everywhere"))
    assert response.status_code == 302
    assert response["Location"] == reverse("orgs:login")
    assert laptop.get(API).status_code == 401
    assert phone.get(API).status_code == 401
    assert colleague.get(API).status_code == 200
    assert session_store().for_user(str(cast.dev_a.user.pk)) == []
    assert AuditEvent.objects.filter(event=AuditEvent.SIGNED_OUT_EVERYWHERE, actor_user=cast.dev_a.user).exists()


def test_log_out_ends_this_session_server_side(cast):
    client = cast.dev_a.client()
    cookies = {name: morsel.value for name, morsel in client.cookies.items()}
    client.post(reverse("orgs:logout"))
    # Replaying the cookies captured before signing out gets nowhere: the record is gone.
    assert _client(cookies).get(API).status_code == 401


def test_changing_the_password_ends_every_other_session(cast):
    client = cast.dev_a.client()
    other = cast.dev_a.client()
    new_password = "a brand new passphrase 77"
    response = client.post(
        reverse("orgs:password_change"),
        {"old_password": PASSWORD, "new_password1": new_password, "new_password2": new_password},
    )
    assert response.status_code == 302
    assert client.get(API).status_code == 200
    assert other.get(API).status_code == 401
    cast.dev_a.user.refresh_from_db()
    assert cast.dev_a.user.check_password(new_password)
    assert AuditEvent.objects.filter(event=AuditEvent.PASSWORD_CHANGED, actor_user=cast.dev_a.user).exists()


def test_a_wrong_current_password_changes_nothing(cast):
    client = cast.dev_a.client()
    other = cast.dev_a.client()
    response = client.post(
        reverse("orgs:password_change"),
        {"old_password": "wrong", "new_password1": "x new passphrase 1", "new_password2": "x new passphrase 1"},
    )
    assert response.status_code == 200
    assert response.context["form"].errors["old_password"]
    assert other.get(API).status_code == 200


# --- The local store (make run without Redis) ---------------------------------------------------------------------


def test_the_local_store_keeps_the_same_rules():
    store = LocalSessionStore()
    now = time.time()
    record = SessionRecord(
        key="k1", user_id="u1", created=now, last_seen=now, absolute_expiry=now + 3600, refresh_hash="h"
    )
    store.create(record, now=now)
    store.create(SessionRecord(**{**record.__dict__, "key": "k2"}), now=now)
    assert store.get("k1") == record
    assert store.update("k1", now=now, org_id="o1")
    assert store.get("k1").org_id == "o1"  # type: ignore[union-attr]
    assert [r.key for r in store.for_user("u1")] == ["k1", "k2"]
    assert store.delete_for_user("u1", keep="k2") == ["k1"]
    assert store.get("k1") is None
    assert not store.update("k1", now=now, last_seen=now)  # never resurrected
    assert store.delete("k2", user_id="u1")
    assert store.for_user("u1") == []


def test_the_session_store_is_redis_whenever_redis_is_configured():
    assert settings.SESSION_STORE == "redis"


# --- The gate cannot be skipped -------------------------------------------------------------------------------------


def test_an_api_view_that_redefines_the_gate_fails_at_import():
    with pytest.raises(TypeError, match="initial"):
        type("Sneaky", (OrgAPIView,), {"capabilities": {"GET": ORG_READ}, "initial": lambda *a, **k: None})
    with pytest.raises(TypeError, match="authentication_classes"):
        type("Sneaky", (OrgAPIView,), {"authentication_classes": []})
    mixin = type("SneakyMixin", (), {"dispatch": lambda *a, **k: None})
    with pytest.raises(TypeError, match="dispatch"):
        type("Sneaky", (mixin, OrgAPIView), {})


def test_the_api_gate_cannot_be_replaced_by_a_later_mixin_or_as_view_arguments():
    from rest_framework.generics import GenericAPIView
    from rest_framework.permissions import AllowAny

    # A mixin after OrgAPIView: what OrgAPIView defines wins anyway, and a hook it inherits cannot be replaced.
    later = type("LaterMixin", (GenericAPIView,), {"permission_classes": [AllowAny]})
    view: Any = type("Sneaky", (OrgAPIView, later), {"capabilities": {"GET": ORG_READ}})
    assert view.permission_classes is OrgAPIView.permission_classes
    hook = type("HookMixin", (GenericAPIView,), {"check_permissions": lambda *a, **k: None})
    with pytest.raises(TypeError, match="check_permissions"):
        type("Sneaky", (OrgAPIView, hook), {"capabilities": {"GET": ORG_READ}})
    honest: Any = type("Honest", (OrgAPIView,), {"capabilities": {"GET": ORG_READ}})
    with pytest.raises(TypeError, match="initial"):
        honest.as_view(initial=lambda *a, **k: None)
    with pytest.raises(TypeError, match="permission_classes"):
        honest.as_view(permission_classes=[AllowAny])


def test_pages_refuse_a_key_in_the_url_like_the_api(cast):
    response = cast.dev_a.client().get(f"{reverse('orgs:home')}?api_key={cast.dev_a.api_secret}")
    assert response.status_code == 401
    assert b"never in the URL" in response.content


def test_a_page_that_redefines_dispatch_fails_at_import():
    from django.views import View

    with pytest.raises(TypeError, match="dispatch"):
        type("Sneaky", (OrgViewMixin, View), {"capability": ORG_READ, "dispatch": lambda *a, **k: None})
    honest: Any = type("Honest", (OrgViewMixin, View), {"capability": ORG_READ})
    with pytest.raises(TypeError, match="dispatch"):
        honest.as_view(dispatch=lambda *a, **k: None)
