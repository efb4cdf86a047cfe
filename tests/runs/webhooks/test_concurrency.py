"""Copies of one delivery arriving at the same moment (GitHub retrying while the first is still being handled, or an
attacker racing a replay) start one run between them. Real threads and real commits, hence transaction=True."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from django.db import connection
from django.test import Client

from runs.models import Run, WebhookDelivery
from tests.runs.webhooks import payloads
from tests.runs.webhooks.conftest import REPOSITORY, Hook, deliver

pytestmark = pytest.mark.django_db(transaction=True)

COPIES = 6


def _race(hook: Hook, body: bytes, delivery_ids: list[str]) -> list[Any]:
    barrier = threading.Barrier(len(delivery_ids))
    responses: list[Any] = [None] * len(delivery_ids)

    def post(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            # One client per thread: the test client keeps per-request state and is not meant to be shared.
            client = Client()
            responses[index] = deliver(client, hook.project.id, body, secret=hook.secret, delivery=delivery_ids[index])
        finally:
            connection.close()  # each thread has its own connection; leave none open for the flush

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(delivery_ids))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return responses


def test_concurrent_copies_of_one_delivery_start_one_run(hook: Hook):
    body = payloads.encode(payloads.issues_labeled(REPOSITORY))
    delivery = str(uuid.uuid4())
    responses = _race(hook, body, [delivery] * COPIES)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * (COPIES - 1) + [202]
    assert Run.objects.count() == 1
    assert WebhookDelivery.objects.count() == 1


def test_concurrent_replays_under_fresh_delivery_ids_start_one_run(hook: Hook):
    body = payloads.encode(payloads.issues_labeled(REPOSITORY))
    responses = _race(hook, body, [str(uuid.uuid4()) for _ in range(COPIES)])
    assert sorted(r.json()["status"] for r in responses) == ["duplicate"] * (COPIES - 1) + ["run_started"]
    assert Run.objects.count() == 1
    assert WebhookDelivery.objects.filter(outcome="duplicate").count() == COPIES - 1
