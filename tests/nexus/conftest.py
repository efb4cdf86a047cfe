"""Nexus fixtures: enrolled operators (a known TOTP secret, so tests can play the authenticator) and clients
signed in through the real session store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.test import Client
from django.utils import timezone

from nexus.models import Operator, OperatorRole
from nexus.sessions import OperatorSession, operator_session_start
from nexus.totp import STEP_SECONDS, totp_code_at, totp_generate_secret, totp_seal

OPERATOR_PASSWORD = "operator passphrase 9 lives"


@dataclass
class EnrolledOperator:
    operator: Operator
    secret: str

    def code(self, *, now: float | None = None, offset: int = 0) -> str:
        step = int((time.time() if now is None else now) // STEP_SECONDS) + offset
        return totp_code_at(self.secret, step)


def make_operator(
    email: str = "ops@ops.example", *, role: str = OperatorRole.SUPPORT, enrolled: bool = True
) -> EnrolledOperator:
    operator = Operator(email=email, name=email.split("@")[0].title(), role=role)
    operator.set_password(OPERATOR_PASSWORD)
    secret = totp_generate_secret()
    operator.totp_sealed = totp_seal(secret=secret, operator_id=operator.pk)
    operator.totp_enrolled_at = timezone.now() if enrolled else None
    operator.save()
    return EnrolledOperator(operator=operator, secret=secret)


@pytest.fixture
def operator(db: Any) -> EnrolledOperator:
    return make_operator()


@pytest.fixture
def admin_operator(db: Any) -> EnrolledOperator:
    return make_operator("root@ops.example", role=OperatorRole.ADMIN)


def nexus_url(rest: str = "") -> str:
    return f"/{django_settings.NEXUS_PREFIX}/{rest}"


def nexus_sign_in(client: Any, operator: Operator) -> tuple[str, OperatorSession]:
    """A Nexus session straight from the store (no TOTP step used up); sets the cookie on ``client``."""
    token, record = operator_session_start(operator=operator, ip="127.0.0.1", user_agent="pytest")
    client.cookies[django_settings.NEXUS_COOKIE_NAME] = token
    return token, record


@pytest.fixture
def nexus_client(operator: EnrolledOperator) -> Client:
    client = Client()
    nexus_sign_in(client, operator.operator)
    return client


def post_sign_in(client: Client, email: str, password: str, code: str, **extra: Any) -> Any:
    return client.post(nexus_url("login/"), {"email": email, "password": password, "code": code}, **extra)
