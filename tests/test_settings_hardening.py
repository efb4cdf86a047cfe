"""Settings that refuse unsafe configurations (issue #14 point 5): DEBUG only when asked for and never in production,
and a channel-layer key that is not ``SECRET_KEY`` in disguise.

Refusals run Django in a subprocess (settings are read once per process, at startup, as in production); what counts
as a disguised ``SECRET_KEY`` is checked directly on ``cesaflow.lib.derived``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import subprocess
import sys

import pytest
from django.utils.crypto import salted_hmac

from cesaflow.lib.derived import reuses_secret
from tests.test_settings import ROOT, _manage, _production_env

# --- DEBUG ----------------------------------------------------------------------------------------------------------


def _development_debug(tmp_path, **overrides: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CESAFLOW_", "DATABASE_URL", "REDIS_URL"))}
    env.update(CESAFLOW_VAR_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="cesaflow.settings", **overrides)
    code = "import django; django.setup(); from django.conf import settings; print(settings.DEBUG)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_development_runs_without_debug_unless_it_is_asked_for(tmp_path):
    assert _development_debug(tmp_path) == "False"  # CESAFLOW_ENV unset is not a request for DEBUG
    assert _development_debug(tmp_path, CESAFLOW_DEBUG="true") == "True"


def test_production_refuses_debug():
    result = _manage(_production_env(CESAFLOW_DEBUG="true"), "check")
    assert result.returncode != 0
    assert "CESAFLOW_DEBUG is for development only" in result.stderr
    assert _manage(_production_env(CESAFLOW_DEBUG="false"), "check").returncode == 0


def test_make_run_asks_for_debug():
    # What `make run` would execute (-n: print, run nothing); the developer's own CESAFLOW_DEBUG still wins.
    env = {k: v for k, v in os.environ.items() if k != "CESAFLOW_DEBUG"}
    result = subprocess.run(["make", "-n", "run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    serve = [line for line in result.stdout.splitlines() if "cesaflow.serve runserver" in line]
    assert serve
    assert 'CESAFLOW_DEBUG="${CESAFLOW_DEBUG:-true}"' in serve[0]


# --- The channel-layer key ------------------------------------------------------------------------------------------

SECRET_KEY = secrets.token_urlsafe(50)
_SHA256 = hashlib.sha256(SECRET_KEY.encode()).digest()


@pytest.mark.parametrize(
    "layer_key",
    [
        pytest.param(SECRET_KEY, id="equal"),
        pytest.param(f"channels-{SECRET_KEY}-1", id="contains"),
        pytest.param(SECRET_KEY[4:40], id="contained"),
        pytest.param(SECRET_KEY.upper(), id="equal-ignoring-case"),
        pytest.param(_SHA256.hex(), id="sha256-hex"),
        pytest.param(_SHA256.hex().upper(), id="sha256-HEX"),
        pytest.param(base64.b64encode(_SHA256).decode(), id="sha256-base64"),
        pytest.param(base64.urlsafe_b64encode(_SHA256).decode().rstrip("="), id="sha256-base64url-unpadded"),
        pytest.param(hashlib.sha512(SECRET_KEY.encode()).hexdigest(), id="sha512-hex"),
        pytest.param(salted_hmac("channels", "", secret=SECRET_KEY).hexdigest(), id="salted-hmac-sha1"),
        pytest.param(
            base64.b64encode(
                salted_hmac("channel_layer", "cesaflow", secret=SECRET_KEY, algorithm="sha256").digest()
            ).decode(),
            id="salted-hmac-sha256-base64",
        ),
    ],
)
def test_a_channel_layer_key_derived_from_the_secret_key_is_recognised(layer_key):
    assert reuses_secret(layer_key, [SECRET_KEY])
    assert reuses_secret(layer_key, [secrets.token_urlsafe(50), SECRET_KEY])  # a fallback counts too


def test_an_independent_channel_layer_key_is_accepted():
    assert not reuses_secret(secrets.token_urlsafe(32), [SECRET_KEY])
    assert not reuses_secret(base64.b64encode(os.urandom(32)).decode(), [SECRET_KEY])


@pytest.mark.parametrize("fallback", [False, True])
def test_production_refuses_a_channel_layer_key_derived_from_the_secret_key(fallback):
    derived = base64.b64encode(_SHA256).decode()
    env = (
        _production_env(CESAFLOW_SECRET_KEY_FALLBACKS=SECRET_KEY, CESAFLOW_CHANNEL_LAYER_KEY=derived)
        if fallback
        else _production_env(CESAFLOW_SECRET_KEY=SECRET_KEY, CESAFLOW_CHANNEL_LAYER_KEY=derived)
    )
    result = _manage(env, "check")
    assert result.returncode != 0
    assert "CESAFLOW_CHANNEL_LAYER_KEY must not reuse or derive from CESAFLOW_SECRET_KEY" in result.stderr
    assert derived not in result.stderr
    assert SECRET_KEY not in result.stderr


# --- Behind a proxy without trusted forwarding ----------------------------------------------------------------------


def test_check_deploy_warns_when_production_leaves_forwarding_undecided():
    undecided = _manage(
        _production_env(CESAFLOW_TRUST_X_FORWARDED_FOR=""), "check", "--deploy", "--fail-level", "WARNING"
    )
    assert undecided.returncode != 0
    assert "orgs.W001" in undecided.stderr
    assert "CESAFLOW_TRUST_X_FORWARDED_FOR is not set" in undecided.stderr
    for decided in ("true", "false"):
        env = _production_env(CESAFLOW_TRUST_X_FORWARDED_FOR=decided)
        result = _manage(env, "check", "--deploy", "--fail-level", "WARNING")
        assert result.returncode == 0, result.stderr
