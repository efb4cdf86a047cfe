"""The world the API fuzzer works in: org A (whose key it holds) and org B (whose objects it must never reach).

Users, orgs, memberships and the org API keys are made with the services in the test process; everything else
(provider keys on the simulator, projects, runs and so usage and audit events) goes through the REST API of the
live server, each org with its own key, so the seed is itself made the way clients make things.

Everything org B owns carries ``marker`` in its name or label; its ids are collected afterwards by reading org B's
own listings with its own key. A response to org A that contains any of them is a cross-org read.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from orgs.models import ApiKey, Organization, Role, User
from orgs.permissions import ADMIN_CAPABILITIES, DEFAULT_API_KEY_SCOPES
from orgs.services import api_key_create, organization_create

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SEED_WAIT_SECONDS = 30.0  # a deadline for the seeded runs to finish, never an expected duration
LISTINGS = ("org", "members", "api-keys", "provider-keys", "projects", "runs", "audit-events", "usage?group_by=member")


@dataclass
class World:
    """What the fuzzer's hooks need (no secrets: the org A key travels in the environment of ``st`` only)."""

    base_url: str
    simulator_url: str  # the OpenAI dialect of the provider simulator: every base_url the fuzzer sends goes there
    marker: str  # in every name and label of org B
    foreign_ids: list[str] = field(default_factory=list)  # every id org B's own listings show
    # Org A's objects the fuzzer may use as path or body values (each kind: a list of ids).
    own: dict[str, list[str]] = field(default_factory=dict)
    # Org A's objects the fuzzer must not destroy or demote, or it would lock itself out: (method, path id).
    protected: dict[str, str] = field(default_factory=dict)
    # Org B's objects by path parameter, for the explicit 404 probes.
    foreign: dict[str, list[str]] = field(default_factory=dict)

    def dump(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def load(cls, path: Path) -> World:
        return cls(**json.loads(path.read_text()))


@dataclass
class Seeded:
    world: World
    api_key_a: str  # every scope
    org_a: Organization
    org_b: Organization


def _api(base_url: str, secret: str) -> httpx.Client:
    return httpx.Client(base_url=f"{base_url}/api/v1/", headers={"x-api-key": secret}, timeout=20.0)


def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code in (200, 201), (response.request.method, response.request.url, response.text)
    body: dict[str, Any] = response.json()
    return body


def _ids(value: Any) -> Iterator[str]:
    """Every UUID in a JSON document (ids, and ids inside audit metadata or targets)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _ids(item)
    elif isinstance(value, list):
        for item in value:
            yield from _ids(item)
    elif isinstance(value, str):
        yield from UUID_RE.findall(value.lower())


def _org_with_keys(name: str, slug: str, email: str, marker: str) -> tuple[Organization, User, str, User, ApiKey]:
    admin = User.objects.create_user(email=email, password=secrets.token_urlsafe(16), name=f"{name} admin")
    org = organization_create(name=name, admin=admin, slug=slug)
    _, secret = api_key_create(org=org, name=f"{marker} admin key", actor=admin, scopes=sorted(ADMIN_CAPABILITIES))
    developer = User.objects.create_user(
        email=f"dev-{email}", password=secrets.token_urlsafe(16), name=f"{marker} developer"
    )
    org.memberships.create(user=developer, role=Role.DEVELOPER)
    spare, _ = api_key_create(
        org=org, name=f"{marker} spare key", actor=developer, scopes=sorted(DEFAULT_API_KEY_SCOPES)
    )
    return org, admin, secret, developer, spare


def _populate(client: httpx.Client, simulator: dict[str, str], marker: str) -> dict[str, list[str]]:
    """Provider keys, a project and runs through the API; returns their ids by path parameter."""
    keys = [
        _ok(
            client.post(
                "provider-keys",
                json={
                    "provider": flavour,
                    "label": f"{marker} {flavour}",
                    "secret": f"fake-{secrets.token_hex(12)}",
                    "base_url": simulator[flavour],
                },
            )
        )["id"]
        for flavour in ("openai", "anthropic", "groq")
    ]
    project = _ok(
        client.post(
            "projects",
            json={
                "name": f"{marker} project",
                "description": f"{marker} description",
                "default_provider_key": keys[0],
                "default_model": "fake/echo",
            },
        )
    )["id"]
    finished = _ok(
        client.post(
            "runs",
            json={"provider_key": keys[0], "model": "fake/echo", "objective": f"{marker} objective", "watch": False},
        )
    )["id"]
    deadline = time.monotonic() + SEED_WAIT_SECONDS
    while _ok(client.get(f"runs/{finished}"))["finished_at"] is None:
        assert time.monotonic() < deadline, "the seeded run did not finish"
        time.sleep(0.05)
    # A run that waits for its watcher, then cancelled: a terminal run that never called the provider.
    cancelled = _ok(
        client.post("runs", json={"provider_key": keys[1], "model": "fake/echo", "objective": f"{marker} waits"})
    )["id"]
    _ok(client.post(f"runs/{cancelled}/cancel"))
    return {"key_id": keys, "project_id": [project], "run_id": [finished, cancelled]}


def seed(base_url: str, simulator: dict[str, str]) -> Seeded:
    """Both orgs, committed (the live server reads them); the caller's test is a transactional one."""
    marker = f"bravo{secrets.token_hex(6)}"
    org_a, admin_a, secret_a, developer_a, spare_a = _org_with_keys("Org A", "fuzz-a", "alice@a.example", "alpha")
    org_b, _, secret_b, _, _ = _org_with_keys(f"{marker} Org B", "fuzz-b", "bob@b.example", marker)
    with _api(base_url, secret_a) as client_a:
        own = _populate(client_a, simulator, "alpha")
        auth_key = next(key for key in org_a.api_keys.all() if key.name == "alpha admin key")
        admin_membership = org_a.memberships.get(user=admin_a)
        own["member_id"] = [str(org_a.memberships.get(user=developer_a).id)]
        own["api_key_id"] = [str(spare_a.id)]
    with _api(base_url, secret_b) as client_b:
        foreign = _populate(client_b, simulator, marker)
        foreign["member_id"] = [member["id"] for member in _ok(client_b.get("members"))["results"]]
        foreign["api_key_id"] = [key["id"] for key in _ok(client_b.get("api-keys"))["results"]]
        seen: set[str] = set()
        for listing in LISTINGS:
            seen.update(_ids(_ok(client_b.get(listing))))
    world = World(
        base_url=base_url,
        simulator_url=simulator["openai"],
        marker=marker,
        foreign_ids=sorted(seen),
        own=own,
        protected={
            "api_key_id": str(auth_key.id),
            "member_id": str(admin_membership.id),
            "key_id": own["key_id"][0],
            "project_id": own["project_id"][0],
        },
        foreign=foreign,
    )
    return Seeded(world=world, api_key_a=secret_a, org_a=org_a, org_b=org_b)
