"""Fixtures for the GitHub webhook: a project of org A with a simulator key, connected to ``octo-org/widgets``, and a
client that signs and posts deliveries the way GitHub does. Runs stay queued (worker executor): nothing executes."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from keys.models import ProviderKey
from runs.models import Project
from runs.projects.services import project_create
from runs.webhooks.services import project_github_connect
from tests.runs.test_execution_support import sim_key
from tests.runs.webhooks import payloads

REPOSITORY = "octo-org/widgets"


def sign(secret: str, body: bytes) -> str:
    """``X-Hub-Signature-256`` as GitHub computes it, written independently of the code under test."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def hook_url(project_id: uuid.UUID | str) -> str:
    return reverse("webhooks:github", kwargs={"project_id": project_id})


def deliver(
    client: Client,
    project_id: uuid.UUID | str,
    body: bytes,
    *,
    secret: str | None,
    event: str = "issues",
    delivery: str | None = None,
    signature: str | None = None,
    content_type: str = "application/json",
    **extra: Any,
) -> Any:
    """POST raw ``body`` like GitHub: signed with ``secret`` (or the given ``signature``; neither → no header)."""
    headers: dict[str, Any] = {
        "HTTP_X_GITHUB_EVENT": event,
        "HTTP_X_GITHUB_DELIVERY": delivery if delivery is not None else str(uuid.uuid4()),
        "HTTP_USER_AGENT": "GitHub-Hookshot/044aadd",
    }
    if signature is None and secret is not None:
        signature = sign(secret, body)
    if signature is not None:
        headers["HTTP_X_HUB_SIGNATURE_256"] = signature
    headers.update(extra)
    return client.post(hook_url(project_id), data=body, content_type=content_type, **headers)


@dataclass
class Hook:
    """A connected project, its plaintext secret (as shown once to the admin) and a client posting to it."""

    project: Project
    secret: str
    key: ProviderKey
    client: Client

    def deliver(self, payload: dict[str, Any] | bytes, *, event: str = "issues", **kwargs: Any) -> Any:
        body = payload if isinstance(payload, bytes) else payloads.encode(payload)
        kwargs.setdefault("secret", self.secret)
        return deliver(self.client, self.project.id, body, event=event, **kwargs)


def connected_project(
    org: Any, actor: Any, key: ProviderKey, *, name: str, repository: str = REPOSITORY
) -> tuple[Project, str]:
    project = project_create(org=org, actor=actor, name=name, default_provider_key_id=key.id, default_model="fake/echo")
    secret = project_github_connect(project=project, actor=actor, repository=repository)
    return project, secret


@pytest.fixture
def hook(cast, simulator, settings) -> Hook:
    settings.RUN_EXECUTOR = "worker"
    key = sim_key(cast.org_a, cast.admin_a.user, simulator)
    project, secret = connected_project(cast.org_a, cast.admin_a.user, key, name="Widgets")
    return Hook(project=project, secret=secret, key=key, client=Client())
