"""Security headers on dashboard pages, CSRF on every form, and templates the CSP can enforce."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse

from tests.signin import sign_in

pytestmark = pytest.mark.django_db

TEMPLATES_DIR = Path(settings.BASE_DIR) / "templates"


def _csp_directives(response) -> dict[str, list[str]]:
    policy = response["Content-Security-Policy"]
    directives: dict[str, list[str]] = {}
    for part in policy.split(";"):
        tokens = part.split()
        if tokens:
            directives[tokens[0]] = tokens[1:]
    return directives


def _assert_security_headers(response) -> None:
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Frame-Options"] == "DENY"
    assert response["Referrer-Policy"] == "strict-origin-when-cross-origin"
    assert response["Cross-Origin-Opener-Policy"] == "same-origin"
    assert response["X-XSS-Protection"] == "0"  # never "1": the auditor itself enabled XSS
    csp = _csp_directives(response)
    assert csp["object-src"] == ["'none'"]
    assert csp["base-uri"] == ["'none'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert "'unsafe-inline'" not in csp["script-src"]
    assert "'unsafe-eval'" not in csp["script-src"]
    assert "Server" not in response.headers
    assert "X-Powered-By" not in response.headers


@pytest.mark.parametrize("name", ["orgs:home", "orgs:team", "orgs:api_keys", "orgs:settings", "runs:audit"])
def test_dashboard_pages_carry_security_headers_and_no_store(cast, name):
    response = cast.admin_a.client().get(reverse(name))
    assert response.status_code == 200
    _assert_security_headers(response)
    assert response["Cache-Control"] == "no-store"


def test_audit_csv_is_not_cached(cast):
    response = cast.admin_a.client().get(reverse("runs:audit_csv"))
    assert response["Cache-Control"] == "no-store"
    _assert_security_headers(response)


@pytest.mark.parametrize("name", ["orgs:login", "orgs:signup"])
def test_public_pages_carry_security_headers(name):
    response = Client().get(reverse(name))
    assert response.status_code == 200
    _assert_security_headers(response)


@pytest.mark.parametrize("name", ["orgs:team", "orgs:api_keys", "orgs:settings"])
def test_dashboard_forms_carry_a_csrf_token(cast, name):
    content = cast.admin_a.client().get(reverse(name)).content.decode()
    forms = re.findall(r"<form\b[^>]*method=\"post\"[^>]*>(.*?)</form>", content, flags=re.S)
    assert forms
    for body in forms:
        assert 'name="csrfmiddlewaretoken"' in body


def test_post_without_csrf_token_is_refused(cast):
    client = Client(enforce_csrf_checks=True)
    sign_in(client, cast.admin_a.user)
    response = client.post(reverse("orgs:settings"), {"name": "CSRF'd"})
    assert response.status_code == 403
    cast.org_a.refresh_from_db()
    assert cast.org_a.name == "Org A"


def test_post_with_csrf_token_is_accepted(cast):
    client = Client(enforce_csrf_checks=True)
    sign_in(client, cast.admin_a.user)
    page = client.get(reverse("orgs:settings")).content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert token
    response = client.post(reverse("orgs:settings"), {"name": "Renamed", "csrfmiddlewaretoken": token.group(1)})
    assert response.status_code == 302


def test_login_without_csrf_token_is_refused(cast):
    response = Client(enforce_csrf_checks=True).post(
        reverse("orgs:login"), {"email": "alice@a.example", "password": "correct horse battery staple 42"}
    )
    assert response.status_code == 403


def _templates() -> list[Path]:
    return sorted(TEMPLATES_DIR.rglob("*.html"))


def test_templates_have_no_inline_scripts_styles_or_handlers():
    """The CSP has no 'unsafe-inline': inline code would silently not run, so none may be written."""
    assert _templates()
    offenders: list[str] = []
    for path in _templates():
        text = path.read_text()
        for match in re.finditer(r"<script\b([^>]*)>(.*?)</script>", text, flags=re.S | re.I):
            attributes, body = match.groups()
            if "src=" not in attributes or body.strip():
                offenders.append(f"{path}: inline <script>")
        if re.search(r"<style\b", text, flags=re.I):
            offenders.append(f"{path}: <style> element")
        if re.search(r"\sstyle\s*=", text, flags=re.I):
            offenders.append(f"{path}: style= attribute")
        if re.search(r"\son[a-z]+\s*=", text, flags=re.I):
            offenders.append(f"{path}: inline event handler")
        if re.search(r"javascript:", text, flags=re.I):
            offenders.append(f"{path}: javascript: URL")
    assert offenders == []
