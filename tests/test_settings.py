"""Production settings refuse to start without their secrets and pass `check --deploy` when complete.

Each case runs Django in a subprocess: settings are read once per process, at startup, as in production.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _keyring() -> str:
    return "1:" + base64.b64encode(secrets.token_bytes(32)).decode()


def _production_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CESAFLOW_", "DATABASE_URL", "REDIS_URL"))}
    env.update(
        CESAFLOW_ENV="production",
        CESAFLOW_SECRET_KEY=secrets.token_urlsafe(50),
        DATABASE_URL=os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/cesaflow"),
        REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/1"),
        CESAFLOW_KEYRING=_keyring(),
        CESAFLOW_SESSION_KEYS=_keyring(),
        CESAFLOW_ALLOWED_HOSTS="cesaflow.example.com",
        CESAFLOW_CHANNEL_LAYER_KEY=secrets.token_urlsafe(32),
        CESAFLOW_TRUST_X_FORWARDED_FOR="true",  # behind the TLS proxy, which sets it (README: deployment)
        # Keep development files out of the way: production must not need var/.
        CESAFLOW_VAR_DIR="/nonexistent/cesaflow-var",
    )
    env.update(overrides)
    return {k: v for k, v in env.items() if v != ""}


def _manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_complete_production_settings_pass_check_deploy_without_warnings():
    result = _manage(_production_env(), "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize(
    "missing",
    [
        "CESAFLOW_SECRET_KEY",
        "DATABASE_URL",
        "REDIS_URL",
        "CESAFLOW_KEYRING",
        "CESAFLOW_SESSION_KEYS",
        "CESAFLOW_ALLOWED_HOSTS",
        "CESAFLOW_CHANNEL_LAYER_KEY",
    ],
)
def test_production_refuses_to_start_without(missing):
    result = _manage(_production_env(**{missing: ""}), "check")
    assert result.returncode != 0
    assert missing in result.stderr


def test_production_refuses_a_non_postgres_database():
    result = _manage(_production_env(DATABASE_URL="sqlite:///tmp/x.sqlite3"), "check")
    assert result.returncode != 0
    assert "PostgreSQL" in result.stderr


@pytest.mark.parametrize(
    ("keyring", "message"),
    [
        ("1:" + base64.b64encode(b"short").decode(), "32 bytes"),
        ("1:not base64!", "base64"),
        ("1:{k},1:{k}", "appears twice"),
        ("nokid", "<kid>:<base64 key>"),
    ],
)
def test_invalid_keyring_is_refused_with_a_reason_but_no_key_material(keyring, message):
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    keyring = keyring.format(k=key)
    result = _manage(_production_env(CESAFLOW_KEYRING=keyring), "check")
    assert result.returncode != 0
    assert message in result.stderr
    assert key not in result.stderr


def test_keyring_derived_from_the_secret_key_is_refused():
    secret_key = secrets.token_urlsafe(50)
    derived = base64.b64encode(hashlib.sha256(secret_key.encode()).digest()).decode()
    result = _manage(_production_env(CESAFLOW_SECRET_KEY=secret_key, CESAFLOW_KEYRING=f"1:{derived}"), "check")
    assert result.returncode != 0
    assert "must not reuse or derive from" in result.stderr


def test_session_keys_shared_with_the_provider_keyring_are_refused():
    keyring = _keyring()
    result = _manage(_production_env(CESAFLOW_KEYRING=keyring, CESAFLOW_SESSION_KEYS=keyring), "check")
    assert result.returncode != 0
    assert "CESAFLOW_SESSION_KEYS must not reuse" in result.stderr


def test_session_keys_derived_from_the_secret_key_are_refused():
    secret_key = secrets.token_urlsafe(50)
    derived = base64.b64encode(hashlib.sha256(secret_key.encode()).digest()).decode()
    result = _manage(_production_env(CESAFLOW_SECRET_KEY=secret_key, CESAFLOW_SESSION_KEYS=f"1:{derived}"), "check")
    assert result.returncode != 0
    assert "CESAFLOW_SESSION_KEYS must not reuse" in result.stderr
    assert derived not in result.stderr


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CESAFLOW_SESSION_TOKEN_SECONDS", "901", "at most 900"),
        ("CESAFLOW_SESSION_IDLE_SECONDS", "90000", "must not exceed"),
        ("CESAFLOW_STREAM_REVALIDATE_SECONDS", "31", "at most 30"),
        ("CESAFLOW_SESSION_KEYS", "1:not base64!", "CESAFLOW_SESSION_KEYS is invalid"),
    ],
)
def test_session_settings_out_of_bounds_are_refused(name, value, message):
    result = _manage(_production_env(**{name: value}), "check")
    assert result.returncode != 0
    assert message in result.stderr


def test_production_uses_redis_for_cache_sessions_and_channel_layer_with_encryption():
    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.CACHES['default']['BACKEND'], s.SESSION_STORE, s.CACHES['sessions']['BACKEND'], "
        "s.CHANNEL_LAYERS['default']['BACKEND'], bool(s.CHANNEL_LAYERS['default']['CONFIG']"
        ".get('symmetric_encryption_keys')), s.DEBUG, s.SESSION_COOKIE_NAME, s.SESSION_REFRESH_COOKIE_NAME, "
        "s.SESSION_COOKIE_SECURE, s.MIDDLEWARE.index('orgs.sessions.middleware.SessionTokenMiddleware') < "
        "s.MIDDLEWARE.index('django.contrib.auth.middleware.LoginRequiredMiddleware'))"
    )
    env = _production_env(DJANGO_SETTINGS_MODULE="cesaflow.settings")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "django_redis.cache.RedisCache",
        "redis",
        "django_redis.cache.RedisCache",
        "cesaflow.lib.channel_layer.RedisChannelLayer",
        "True",
        "False",
        "__Host-cf_session",
        "__Host-cf_refresh",
        "True",
        "True",
    ]


def test_postgres_uses_a_connection_pool_sized_from_the_environment():
    code = (
        "import django; django.setup(); from django.db import connection as c; "
        "pool = c.settings_dict['OPTIONS']['pool']; "
        "print(c.settings_dict['CONN_MAX_AGE'], pool['min_size'], pool['max_size'], c.pool.max_size)"
    )
    env = _production_env(
        DJANGO_SETTINGS_MODULE="cesaflow.settings", CESAFLOW_DB_POOL_MIN="3", CESAFLOW_DB_POOL_MAX="7"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # Django refuses a pool with persistent connections: CONN_MAX_AGE must be 0.
    assert result.stdout.split() == ["0", "3", "7", "7"]


def test_a_pool_minimum_above_its_maximum_is_refused():
    result = _manage(_production_env(CESAFLOW_DB_POOL_MIN="5", CESAFLOW_DB_POOL_MAX="2"), "check")
    assert result.returncode != 0
    assert "CESAFLOW_DB_POOL_MIN must not exceed CESAFLOW_DB_POOL_MAX" in result.stderr


def test_production_refuses_the_unsandboxed_command_mode():
    result = _manage(_production_env(CESAFLOW_SANDBOX="none"), "check")
    assert result.returncode != 0
    assert "CESAFLOW_SANDBOX=none is for development only" in result.stderr
    assert _manage(_production_env(CESAFLOW_SANDBOX="bwrap"), "check").returncode == 0
