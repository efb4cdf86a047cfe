"""Production settings for CesaFlow processes started on loopback by the benchmark (``bench/``), the deployment drill
(``deploy/drill.py``) and the deployment tests (``tests/deploy``): fresh secrets on every call, never written
anywhere or reused, and nothing of the caller's own ``CESAFLOW_*`` environment."""

from __future__ import annotations

import base64
import os
import secrets
import socket
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def random_keyring() -> str:
    """A one-key ring in ``CESAFLOW_KEYRING`` / ``CESAFLOW_SESSION_KEYS`` form."""
    return "1:" + base64.b64encode(secrets.token_bytes(32)).decode()


def production_env(
    *,
    workdir: Path,
    database_url: str,
    redis_url: str,
    allowed_hosts: str = HOST,
    keyring: str | None = None,
    channel_layer_key: str | None = None,
    behind_tls_proxy: bool = False,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a production CesaFlow process on loopback. ``behind_tls_proxy``: it trusts the proxy's
    ``X-Forwarded-For`` and keeps production's HTTPS redirect; otherwise it serves plain HTTP to its clients.
    ``keyring`` / ``channel_layer_key``: to share the caller's (a test that reads what the process wrote)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "HOME": str(workdir),
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "DJANGO_SETTINGS_MODULE": "cesaflow.settings",
        "CESAFLOW_ENV": "production",
        "CESAFLOW_SECRET_KEY": secrets.token_urlsafe(50),
        "CESAFLOW_ALLOWED_HOSTS": allowed_hosts,
        "CESAFLOW_KEYRING": keyring or random_keyring(),
        "CESAFLOW_SESSION_KEYS": random_keyring(),
        "CESAFLOW_CHANNEL_LAYER_KEY": channel_layer_key or secrets.token_urlsafe(32),
        # The provider simulator lives on loopback, which production refuses by default.
        "CESAFLOW_PROVIDER_HOST_ALLOWLIST": HOST,
        "CESAFLOW_VAR_DIR": str(workdir / "var"),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
    }
    if behind_tls_proxy:
        env["CESAFLOW_TRUST_X_FORWARDED_FOR"] = "true"
    else:
        env["CESAFLOW_SSL_REDIRECT"] = "false"
        env["CESAFLOW_TRUST_X_FORWARDED_FOR"] = "false"  # clients connect directly (and check --deploy agrees)
    env.update(extra or {})
    return env
