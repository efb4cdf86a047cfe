"""Canary: a project's webhook secrets (current and previous) and the parts of a payload that are not an objective
leave no trace in the database dump, Redis or the logs (every logger at DEBUG, SQL logging on), whatever deliveries
arrive: valid, forged, replayed, conflicting, oversized. pg_dump sees committed data only, hence transaction=True."""

from __future__ import annotations

import uuid

import pytest
from django.test import Client

from runs.models import Project, Run
from runs.webhooks.services import project_github_rotate
from tests.keys import canary
from tests.keys.conftest import make_ring
from tests.runs.test_execution_support import sim_key
from tests.runs.webhooks import payloads
from tests.runs.webhooks.conftest import REPOSITORY, connected_project, deliver

pytestmark = pytest.mark.django_db(transaction=True)


def test_webhook_secrets_and_payloads_leave_no_trace(cast, simulator, settings):
    settings.DEBUG = True  # worst case: every SQL statement is logged with its parameters
    settings.KEYRING = make_ring(1)
    settings.RUN_EXECUTOR = "worker"
    settings.WEBHOOK_MAX_BODY_BYTES = 8192
    payload_canary = canary.new_canary("CANARYpayload")
    client = Client()
    responses: list[bytes] = []

    def keep(response, status: int) -> None:
        assert response.status_code == status, response.content[:300]
        responses.append(response.content)

    with canary.debug_logging() as logs:
        key = sim_key(cast.org_a, cast.admin_a.user, simulator)
        project, first = connected_project(cast.org_a, cast.admin_a.user, key, name="Canary")
        second = project_github_rotate(project=project, actor=cast.admin_a.user)

        issue = payloads.issues_labeled(REPOSITORY, title="Canary run", body="Nothing secret here.")
        issue["sender"]["login"] = payload_canary  # a field that is never an objective: must not be stored
        issue["repository"]["description"] = payload_canary
        body = payloads.encode(issue)
        delivery = str(uuid.uuid4())
        keep(deliver(client, project.id, body, secret=second, delivery=delivery), 202)
        keep(deliver(client, project.id, body, secret=second, delivery=delivery), 200)  # replay
        keep(deliver(client, project.id, body + b" ", secret=first, delivery=delivery), 409)  # same id, other body
        keep(deliver(client, project.id, payloads.encode(payloads.ping(REPOSITORY)), secret=first, event="ping"), 200)
        keep(deliver(client, project.id, body, secret="forged"), 401)
        keep(deliver(client, project.id, body, secret=None), 401)
        keep(deliver(client, uuid.uuid4(), body, secret=second), 401)
        keep(deliver(client, project.id, b"{" + b" " * 9000 + b"}", secret=second), 413)
        keep(deliver(client, project.id, b"{not json " + payload_canary.encode(), secret=second), 400)
        comment = payloads.issue_comment_created(REPOSITORY, body="/cesaflow go", association="NONE")
        comment["comment"]["user"]["login"] = payload_canary
        keep(deliver(client, project.id, payloads.encode(comment), secret=second, event="issue_comment"), 202)
        sealed = Project.objects.get(pk=project.pk).github_secret_sealed

    assert Run.objects.filter(project=project).count() == 1
    collected = canary.Collected()
    canary.collect_pg_dump(collected)
    canary.collect_redis(collected)
    collected.add("logs", logs.text())
    collected.add("responses", b"\n".join(responses))

    # The collection is real: the dump holds the sealed secret and the delivery rows, the logs hold the SQL, Redis
    # holds the rate limit of the forged deliveries.
    assert sealed.encode() in collected.blobs["pg_dump"]
    assert delivery.encode() in collected.blobs["pg_dump"]
    assert b"Canary run" in collected.blobs["pg_dump"]  # the objective is stored, like any objective
    assert b'INSERT INTO "runs_webhookdelivery"' in collected.blobs["logs"]
    assert b"webhooks:signature-failed" in collected.blobs.get("redis:keys", b"")
    hits = canary.scan(collected, [first, second, payload_canary])
    assert hits == [], f"canary found: {hits}"
