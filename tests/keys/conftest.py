"""Fixtures for the provider-key vault: keyrings with known kids, and keys for each org of the cast."""

from __future__ import annotations

import base64
import os
import secrets

import pytest

from keys.crypto import Keyring
from keys.models import Provider
from keys.services import provider_key_create
from runs.simulator import SimulatorThread

# One random 32-byte key per kid for the whole test session: rings built from these agree with each other, the
# way a real deployment's old and new CESAFLOW_KEYRING values share the kids they have in common.
_MATERIAL = {kid: base64.b64encode(os.urandom(32)).decode() for kid in range(1, 6)}


def make_ring(*kids: int, min_kid: int = 0) -> Keyring:
    """A keyring with ``kids`` (the first is the primary)."""
    return Keyring.parse(",".join(f"{kid}:{_MATERIAL[kid]}" for kid in kids), min_kid=min_kid)


def fake_secret(prefix: str = "sk-proj-") -> str:
    return prefix + secrets.token_urlsafe(36)


@pytest.fixture
def ring1(settings) -> Keyring:
    """The settings' keyring is {1 (primary)}."""
    ring = make_ring(1)
    settings.KEYRING = ring
    return ring


@pytest.fixture
def secret_a() -> str:
    return fake_secret()


@pytest.fixture
def key_a(cast, ring1, secret_a):
    return provider_key_create(
        org=cast.org_a, actor=cast.admin_a.user, provider=Provider.OPENAI, label="prod", secret=secret_a
    )


@pytest.fixture
def key_b(cast, ring1):
    return provider_key_create(
        org=cast.org_b, actor=cast.admin_b.user, provider=Provider.OPENAI, label="prod", secret=fake_secret()
    )


@pytest.fixture(scope="module")
def sim():
    """A provider simulator recording its requests, one per test module."""
    thread = SimulatorThread(record_requests=True).start()
    yield thread
    thread.stop()


@pytest.fixture
def sim_clean(sim):
    """``sim`` with its queues and request log emptied before and after the test."""
    sim.state.reset()
    yield sim
    sim.state.reset()
