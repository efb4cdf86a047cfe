"""Operator sessions: the Nexus cookie, its Redis record (hashed key, absolute TTL never extended), idle and absolute
timeouts, sign-out, fail-closed store, and the separation from the dashboard's sessions in both directions."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client, RequestFactory
from django_redis import get_redis_connection
from freezegun import freeze_time

from nexus import audit
from nexus.models import InstallationEvent, Operator
from nexus.sessions import (
    LocalOperatorSessionStore,
    OperatorSession,
    RedisOperatorSessionStore,
    SessionStoreUnavailable,
    operator_session_store,
)
from orgs.sessions.store import session_key
from tests.conftest import PASSWORD
from tests.nexus.conftest import (
    OPERATOR_PASSWORD,
    EnrolledOperator,
    nexus_sign_in,
    nexus_url,
    post_sign_in,
)
from tests.signin import sign_in

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
NEXUS_MIDDLEWARE = "nexus.middleware.NexusSessionMiddleware"
SESSION_MIDDLEWARE = "orgs.sessions.middleware.SessionTokenMiddleware"
EIGHT_HOURS = 8 * 3600


def _at(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)


def _redis_key(token: str) -> str:
    return f"{settings.SESSION_STORE_PREFIX}:nexus:s:{session_key(token)}"


def _signed_in_by_form(client: Client, operator: EnrolledOperator) -> str:
    response = post_sign_in(client, operator.operator.email, OPERATOR_PASSWORD, operator.code())
    assert response.status_code == 302, response.content
    return str(client.cookies[settings.NEXUS_COOKIE_NAME].value)


# --- Signing in and the cookie ---------------------------------------------------------------------------------------


def test_sign_in_sets_a_strict_httponly_cookie_scoped_to_the_nexus_path(operator):
    client = Client()
    response = post_sign_in(client, "OPS@ops.example", OPERATOR_PASSWORD, operator.code())
    assert response.status_code == 302
    assert response["Location"] == nexus_url()
    morsel = response.cookies[settings.NEXUS_COOKIE_NAME]
    assert morsel["path"] == nexus_url()
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Strict"
    assert not morsel["secure"]  # development settings; see the next test
    assert 0 < int(morsel["max-age"]) <= EIGHT_HOURS
    home = client.get(nexus_url())
    assert home.status_code == 200
    assert b"Support (read-only)" in home.content
    assert home.wsgi_request.user == operator.operator
    assert InstallationEvent.objects.filter(event=audit.SIGNED_IN, operator=operator.operator).count() == 1


def test_nexus_cookie_is_secure_when_session_cookies_are(operator, settings):
    settings.SESSION_COOKIE_SECURE = True
    response = post_sign_in(Client(), operator.operator.email, OPERATOR_PASSWORD, operator.code(), secure=True)
    assert response.cookies[settings.NEXUS_COOKIE_NAME]["secure"] is True


def test_signing_in_again_replaces_the_previous_session(operator):
    client = Client()
    first = _signed_in_by_form(client, operator)
    second_code = operator.code(offset=1)  # the first code's step is used up
    assert post_sign_in(client, operator.operator.email, OPERATOR_PASSWORD, second_code).status_code == 302
    second = client.cookies[settings.NEXUS_COOKIE_NAME].value
    assert second != first
    assert operator_session_store().get(session_key(first)) is None


# --- The record in Redis ---------------------------------------------------------------------------------------------


def test_redis_key_is_a_hash_of_the_token_and_the_raw_token_is_nowhere_in_redis(operator):
    client = Client()
    token = _signed_in_by_form(client, operator)
    redis = get_redis_connection("sessions")
    assert redis.exists(_redis_key(token))
    for key in redis.scan_iter("*"):
        assert token.encode() not in key
        if redis.type(key) == b"hash":
            assert all(token.encode() not in value for value in redis.hgetall(key).values())


def test_redis_ttl_is_at_most_eight_hours_and_requests_never_extend_it(operator):
    client = Client()
    token = _signed_in_by_form(client, operator)
    redis = get_redis_connection("sessions")
    ttl_before = redis.pttl(_redis_key(token))
    assert 0 < ttl_before <= EIGHT_HOURS * 1000
    before = operator_session_store().get(session_key(token))
    assert before is not None
    # Two minutes later (past the touch interval): the request moves last_seen inside the record...
    with freeze_time(_at(time.time() + 120), tick=True):
        assert client.get(nexus_url()).status_code == 200
    record = operator_session_store().get(session_key(token))
    assert record is not None
    assert record.last_seen > before.last_seen
    # ...and the key's expiry has not moved (Redis's own clock: only the real milliseconds elapsed).
    ttl_after = redis.pttl(_redis_key(token))
    assert 0 < ttl_after <= ttl_before


def test_idle_timeout_signs_the_operator_out(operator, settings):
    client = Client()
    token = _signed_in_by_form(client, operator)
    with freeze_time(_at(time.time() + settings.NEXUS_SESSION_IDLE_SECONDS + 5)):
        response = client.get(nexus_url())
    assert response.status_code == 302
    assert response["Location"].startswith(nexus_url("login/"))
    assert response.cookies[settings.NEXUS_COOKIE_NAME].value == ""
    assert operator_session_store().get(session_key(token)) is None


def test_absolute_lifetime_ends_an_active_session_after_eight_hours(operator, settings):
    client = Client()
    start = time.time()
    token = _signed_in_by_form(client, operator)
    # Active all day: a request every 25 minutes keeps the idle clock fresh...
    for elapsed in range(1500, EIGHT_HOURS, 1500):
        with freeze_time(_at(start + elapsed)):
            assert client.get(nexus_url()).status_code == 200, elapsed
    # ...and still, 8 hours after sign-in, the session is over.
    with freeze_time(_at(start + EIGHT_HOURS + 1)):
        response = client.get(nexus_url())
    assert response.status_code == 302
    assert operator_session_store().get(session_key(token)) is None


def test_a_session_deleted_server_side_signs_the_operator_out(nexus_client):
    assert nexus_client.get(nexus_url()).status_code == 200
    get_redis_connection("sessions").delete(_redis_key(nexus_client.cookies[settings.NEXUS_COOKIE_NAME].value))
    response = nexus_client.get(nexus_url())
    assert response.status_code == 302
    assert response["Location"].startswith(nexus_url("login/"))
    assert response.cookies[settings.NEXUS_COOKIE_NAME].value == ""


def test_a_deactivated_operator_is_signed_out(operator, nexus_client):
    operator.operator.is_active = False
    operator.operator.save(update_fields=["is_active"])
    assert nexus_client.get(nexus_url()).status_code == 302


def test_sign_out_deletes_the_record_clears_the_cookie_and_is_audited(operator):
    client = Client()
    token = _signed_in_by_form(client, operator)
    assert client.get(nexus_url("logout/")).status_code == 405  # never by GET (a link or an image could)
    response = client.post(nexus_url("logout/"))
    assert response.status_code == 302
    assert response["Location"] == nexus_url("login/")
    assert response.cookies[settings.NEXUS_COOKIE_NAME].value == ""
    assert operator_session_store().get(session_key(token)) is None
    assert InstallationEvent.objects.filter(event=audit.SIGNED_OUT, operator=operator.operator).count() == 1
    # A copy of the old cookie is worthless.
    stale = Client()
    stale.cookies[settings.NEXUS_COOKIE_NAME] = token
    assert stale.get(nexus_url()).status_code == 302


def test_store_unavailable_means_503_never_trust(operator, monkeypatch):
    client = Client()
    nexus_sign_in(client, operator.operator)

    def down(*args: Any, **kwargs: Any) -> Any:
        raise SessionStoreUnavailable("ConnectionError")

    monkeypatch.setattr(RedisOperatorSessionStore, "_run", down)
    response = client.get(nexus_url())
    assert response.status_code == 503
    assert response.wsgi_request.user.is_anonymous
    # Signing in needs the store too: 503, no session handed out.
    response = post_sign_in(Client(), operator.operator.email, OPERATOR_PASSWORD, operator.code())
    assert response.status_code == 503
    assert settings.NEXUS_COOKIE_NAME not in response.cookies


def test_local_store_keeps_the_deadline_on_touch_and_forgets_on_delete():
    store = LocalOperatorSessionStore()
    now = time.time()
    record = OperatorSession(key="k", operator_id="o", created=now, last_seen=now, absolute_expiry=now + 100)
    store.create(record, ttl=100)
    deadline = store._records["k"][1]
    assert store.touch("k", last_seen=now + 50)
    assert store._records["k"][1] == deadline
    touched = store.get("k")
    assert touched is not None
    assert touched.last_seen == now + 50
    with freeze_time(_at(now + 101)):
        assert store.get("k") is None
        assert not store.touch("k", last_seen=now + 101)
    store.create(record, ttl=100)
    assert store.delete("k")
    assert store.get("k") is None


# --- Separation from the dashboard -----------------------------------------------------------------------------------


def test_a_nexus_session_opens_no_dashboard_page_and_no_api_call(nexus_client):
    # The test client sends every cookie it holds whatever its Path: this is the server ignoring it, not the browser.
    dashboard = nexus_client.get("/")
    assert dashboard.status_code == 302
    assert "/login" in dashboard["Location"]
    assert dashboard.wsgi_request.user.is_anonymous
    assert nexus_client.get("/api/v1/runs").status_code == 401


def test_a_dashboard_session_opens_no_nexus_page(cast):
    client = Client()
    sign_in(client, cast.admin_a.user)
    response = client.get(nexus_url())
    assert response.status_code == 302
    assert response["Location"].startswith(nexus_url("login/"))
    assert response.wsgi_request.user.is_anonymous
    assert response.wsgi_request.cf_session is None  # type: ignore[attr-defined]


def test_with_both_cookies_each_side_sees_only_its_own_account(cast, operator):
    client = Client()
    sign_in(client, cast.admin_a.user)
    nexus_sign_in(client, operator.operator)
    assert client.get(nexus_url()).wsgi_request.user == operator.operator
    assert client.get("/api/v1/runs").wsgi_request.user == cast.admin_a.user


def test_dashboard_credentials_do_not_sign_in_to_nexus(cast):
    response = post_sign_in(Client(), cast.admin_a.user.email, PASSWORD, "000000")
    assert response.status_code == 200
    assert b"Email, password or code is incorrect." in response.content
    assert settings.NEXUS_COOKIE_NAME not in response.cookies


# --- Reachability and headers ----------------------------------------------------------------------------------------


def test_a_disallowed_ip_gets_a_plain_404_even_with_a_valid_session(nexus_client, settings):
    settings.NEXUS_ALLOWED_IPS = ["10.1.0.0/16", "192.0.2.7"]
    for path in (nexus_url(), nexus_url("login/"), nexus_url("enrol/anything/")):
        refused = nexus_client.get(path, REMOTE_ADDR="10.2.0.1")
        assert refused.status_code == 404
        assert settings.NEXUS_COOKIE_NAME.encode() not in refused.serialize_headers()
    assert nexus_client.get(nexus_url(), REMOTE_ADDR="10.1.200.3").status_code == 200
    assert nexus_client.get(nexus_url(), REMOTE_ADDR="192.0.2.7").status_code == 200


def test_an_invalid_allowlist_entry_refuses_everyone(nexus_client, settings):
    settings.NEXUS_ALLOWED_IPS = ["not-an-ip"]
    assert nexus_client.get(nexus_url(), REMOTE_ADDR="127.0.0.1").status_code == 404


def test_nexus_is_absent_when_disabled():
    # URLs are built once per process, as in production: a fresh process with the setting off.
    env = {**os.environ, "CESAFLOW_NEXUS_ENABLED": "false"}
    script = (
        "from django.test import Client; from django.urls import Resolver404, resolve\n"
        "try:\n    resolve('/nexus/'); print('resolved')\nexcept Resolver404:\n    print('absent')\n"
        "print(Client().get('/nexus/login/').status_code)\n"
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["absent", "404"]


def test_nexus_pages_send_clickjacking_csp_and_no_store_headers(nexus_client):
    for response in (Client().get(nexus_url("login/")), nexus_client.get(nexus_url())):
        assert response["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in response["Content-Security-Policy"]
        assert "script-src 'self'" in response["Content-Security-Policy"]
        assert "no-store" in response["Cache-Control"]


def test_every_nexus_post_needs_a_csrf_token(operator):
    client = Client(enforce_csrf_checks=True)
    assert post_sign_in(client, operator.operator.email, OPERATOR_PASSWORD, operator.code()).status_code == 403
    nexus_sign_in(client, operator.operator)
    assert client.post(nexus_url("logout/")).status_code == 403
    # With the token from the page, the same sign-out works.
    client.get(nexus_url())
    token = client.cookies[settings.CSRF_COOKIE_NAME].value
    assert client.post(nexus_url("logout/"), HTTP_X_CSRFTOKEN=token).status_code == 302


# --- Integration with settings (these fail until the project applies them; see tests/nexus/conftest.py) ------------


def test_settings_install_the_nexus_middleware_after_session_tokens():
    from cesaflow import settings as project  # the settings module itself, not the fixture's patched copy

    middleware = list(project.MIDDLEWARE)
    assert NEXUS_MIDDLEWARE in middleware
    assert middleware.index(SESSION_MIDDLEWARE) < middleware.index(NEXUS_MIDDLEWARE)
    assert middleware.index(NEXUS_MIDDLEWARE) < middleware.index("django.middleware.csrf.CsrfViewMiddleware")


def test_dashboard_context_processor_leaves_operators_alone():
    from orgs.context_processors import current_org

    request = RequestFactory().get(nexus_url())
    request.user = Operator(email="probe@ops.example")  # type: ignore[assignment]
    request.cf_session = None  # type: ignore[attr-defined]
    assert current_org(request) == {}


def test_an_invalid_allowlist_entry_is_a_system_check_error(settings):
    from nexus.checks import check_allowed_ips

    settings.NEXUS_ALLOWED_IPS = ["10.0.0.0/8", "2001:db8::/32", "not-an-ip"]
    errors = check_allowed_ips(None)
    assert [error.id for error in errors] == ["nexus.E001"]
    assert "not-an-ip" in errors[0].msg
