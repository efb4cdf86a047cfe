"""The canary scan (security.md §7.2, §9 tests 42-43): provider keys added through the API and the dashboard, used,
rejected, revoked and rotated, with every logger at DEBUG, leave no trace of the plaintext in the database dump,
the PostgreSQL WAL and data files, Redis, the logs or the media/workspace roots, in any encoding. A negative
control proves the scanner finds a canary that is written on purpose.

pg_dump sees only committed data, hence ``transaction=True``.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from io import StringIO

import pytest
import redis
from django.conf import settings as django_settings
from django.core.management import call_command
from django.db import connection
from django.urls import reverse

from keys.models import Provider, ProviderKey
from keys.services import ProviderKeyDecryptionError, provider_key_open
from tests.keys import canary
from tests.keys.conftest import make_ring

pytestmark = pytest.mark.django_db(transaction=True)

LIST = reverse("keys_api:provider-key-list")
PAGE = reverse("keys:provider_keys")


class Flows:
    """Runs every path a provider key takes, keeping what the clients received (the one place the key may not
    appear either: nothing ever returns it)."""

    def __init__(self, cast, settings) -> None:
        self.cast = cast
        self.settings = settings
        self.tag = secrets.token_hex(6)
        self.api_key = canary.new_canary("sk-proj-CANARYapi")
        self.form_key = canary.new_canary("sk-ant-api03-CANARYform")
        self.revoked_key = canary.new_canary("gsk_CANARYrevoked")
        self.rejected_key = canary.new_canary("sk-CANARYrejected")
        self.responses: list[bytes] = []

    @property
    def canaries(self) -> list[str]:
        return [self.api_key, self.form_key, self.revoked_key, self.rejected_key]

    def _keep(self, response, status: int):
        assert response.status_code == status, response.content[:500]
        self.responses.append(response.content)
        return response

    def run(self) -> None:
        settings = self.settings
        settings.DEBUG = True  # worst case: Django logs every SQL statement with its parameters at DEBUG
        settings.KEYRING = make_ring(1)
        api = self.cast.admin_a.api()
        dashboard = self.cast.admin_a.client()

        # Added through the API and through the dashboard form.
        created = self._keep(
            api.post(
                LIST, {"provider": "openai", "label": f"canary-{self.tag}", "secret": self.api_key}, format="json"
            ),
            201,
        ).json()
        form = {"provider": "anthropic", "label": f"form-{self.tag}", "secret": self.form_key, "base_url": ""}
        self._keep(dashboard.post(PAGE, form, follow=True), 200)

        # Rejected submissions carrying a key (error paths echo input if anything does).
        bad = {"provider": "openai", "label": "bad/label", "secret": self.rejected_key}
        self._keep(api.post(LIST, bad, format="json"), 400)
        self._keep(dashboard.post(PAGE, {**bad, "base_url": ""}), 400)
        self._keep(api.post(LIST, {**bad, "label": "ok", "base_url": "http://169.254.169.254/"}, format="json"), 400)

        # Another key, revoked through the API; a third one through the dashboard.
        doomed = self._keep(
            api.post(
                LIST, {"provider": "groq", "label": f"doomed-{self.tag}", "secret": self.revoked_key}, format="json"
            ),
            201,
        ).json()
        self._keep(api.delete(reverse("keys_api:provider-key-detail", kwargs={"key_id": doomed["id"]})), 204)

        # Opened for a provider call, before and after a rotation with keys_rewrap.
        key = ProviderKey.objects.get(pk=created["id"])
        with provider_key_open(key=key, actor=self.cast.admin_a.user, purpose="run", reference="canary-run") as s:
            assert s.reveal() == self.api_key
        settings.KEYRING = make_ring(2, 1)
        call_command("keys_rewrap", stdout=StringIO(), stderr=StringIO())
        form_row = ProviderKey.objects.get(org=self.cast.org_a, label=f"form-{self.tag}")
        with provider_key_open(key=form_row, purpose="check") as s:
            assert s.reveal() == self.form_key
        revoke_url = reverse("keys:revoke", kwargs={"key_id": form_row.id})
        self._keep(dashboard.post(revoke_url, follow=True), 200)

        # A tampered row fails closed (and logs a warning) without leaking anything.
        ProviderKey.objects.filter(pk=key.pk).update(provider=Provider.GROQ)
        with pytest.raises(ProviderKeyDecryptionError), provider_key_open(key=key, purpose="run"):
            pass

        # Every read path.
        self._keep(api.get(LIST), 200)
        self._keep(api.get(reverse("keys_api:provider-key-detail", kwargs={"key_id": created["id"]})), 200)
        self._keep(dashboard.get(PAGE), 200)
        self._keep(dashboard.get(reverse("keys:disable_all")), 200)
        self.sealed_example = ProviderKey.objects.get(pk=created["id"]).sealed_secret


def _assert_clean(collected: canary.Collected, flows: Flows) -> None:
    hits = canary.scan(collected, flows.canaries)
    assert hits == [], f"canary found: {hits}"


def test_canary_keys_leave_no_trace_in_the_dump_redis_logs_or_responses(cast, settings):
    flows = Flows(cast, settings)
    with canary.debug_logging() as logs:
        flows.run()
        logging.getLogger("httpx").debug("flushed")  # the httpx loggers are part of the capture too
    collected = canary.Collected()
    canary.collect_pg_dump(collected)
    canary.collect_redis(collected)
    canary.collect_directories(collected)
    collected.add("logs", logs.text())
    collected.add("responses", b"\n".join(flows.responses))

    # The collection is real: the dump holds the rows (as ciphertext), Redis holds the sessions, logs hold the SQL.
    assert flows.sealed_example.encode() in collected.blobs["pg_dump"]
    assert f"canary-{flows.tag}".encode() in collected.blobs["pg_dump"]
    assert collected.blobs.get("redis:keys"), "the dashboard session should be in Redis"
    assert b'INSERT INTO "keys_providerkey"' in collected.blobs["logs"]
    assert b"could not be decrypted" in collected.blobs["logs"]
    _assert_clean(collected, flows)


def test_canary_keys_leave_no_trace_in_the_postgres_wal_or_data_files(cast, settings):
    flows = Flows(cast, settings)
    flows.run()
    collected = canary.Collected()
    canary.collect_pg_files(collected)
    if "pg_files" in collected.unavailable:
        pytest.skip(f"PostgreSQL data directory not readable here: {collected.unavailable['pg_files']}")
    # The WAL really records these writes (so a plaintext INSERT would be in it too).
    assert f"canary-{flows.tag}".encode() in collected.blobs["pg_files:pg_wal"]
    _assert_clean(collected, flows)


def test_negative_control_the_scanner_finds_a_canary_written_on_purpose(cast):
    planted = canary.new_canary()
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    redis_key = f"cf:canary-negative-control:{secrets.token_hex(4)}"
    try:
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE canary_scratch (v text)")
            cursor.execute(
                "INSERT INTO canary_scratch (v) VALUES (%s), (%s), (%s)",
                [
                    planted,  # raw
                    base64.b64encode(b"xy" + planted.encode()).decode(),  # base64 at an offset
                    json.dumps({"wrapped": planted}),  # inside a JSON document
                ],
            )
        client.set(redis_key, f"some value with {planted} inside")
        with canary.debug_logging() as logs:
            logging.getLogger("keys.negative_control").debug("planted %s", planted)
            logging.getLogger("httpx").debug("b64 %s", base64.urlsafe_b64encode(b"z" + planted.encode()).decode())
        collected = canary.Collected()
        canary.collect_pg_dump(collected)
        canary.collect_redis(collected)
        canary.collect_pg_files(collected)
        collected.add("logs", logs.text())
        hits = set(canary.scan(collected, [planted]))
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS canary_scratch")
        client.delete(redis_key)
        client.close()

    assert canary.Hit("pg_dump", "raw") in hits
    assert {h.form for h in hits if h.source == "pg_dump"} & {"base64@1", "base64@2"}
    assert canary.Hit("redis:values", "raw") in hits
    assert canary.Hit("logs", "raw") in hits
    assert {h.form for h in hits if h.source == "logs"} & {"base64url@1", "base64url@2"}
    if "pg_files" not in collected.unavailable:
        assert canary.Hit("pg_files:pg_wal", "raw") in hits


def test_encodings_cover_the_documented_forms():
    value = "sk-proj-CANARY" + secrets.token_hex(13)  # generated: nothing key-shaped is committed
    forms = canary.encodings(value)
    assert set(forms) >= {"raw", "utf-16le", "json", "url", "hex", "base64@0", "base64@1", "base64@2"}
    # An aligned base64 form really is a substring of the base64 of a longer text containing the canary.
    for offset in range(3):
        blob = base64.b64encode(b"p" * (3 - offset) + value.encode() + b"tail")
        assert any(forms[f"base64@{k}"] in blob for k in range(3))
