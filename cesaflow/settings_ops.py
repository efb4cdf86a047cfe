"""Settings: logs and metrics (README "Operating CesaFlow").

A block of ``cesaflow.settings`` in a module of its own so settings.py stays under 600 lines; settings.py imports it
(and nothing else should), after its environment helpers are defined.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from cesaflow.settings import ENV, _env_bool

__all__ = ["ACCESS_LOG", "LOGGING", "LOG_FORMAT", "LOG_LEVEL", "METRICS_TOKEN"]

LOG_LEVEL = os.environ.get("CESAFLOW_LOG_LEVEL", "INFO").upper()
# One JSON object per line in production (for a log shipper), readable lines in development.
LOG_FORMAT = os.environ.get("CESAFLOW_LOG_FORMAT", "json" if ENV == "production" else "plain").strip().lower()
if LOG_FORMAT not in ("json", "plain"):
    raise ImproperlyConfigured("CESAFLOW_LOG_FORMAT must be 'json' or 'plain'.")
# One line per HTTP request (method, path without the query string, status, duration) on ``cesaflow.access``.
ACCESS_LOG = _env_bool("CESAFLOW_ACCESS_LOG", ENV == "production")

# /metrics answers only a scraper presenting this bearer token; unset, /metrics does not exist (404).
METRICS_TOKEN = os.environ.get("CESAFLOW_METRICS_TOKEN", "").strip()
if METRICS_TOKEN and len(METRICS_TOKEN) < 32:
    raise ImproperlyConfigured("CESAFLOW_METRICS_TOKEN must be at least 32 characters (e.g. openssl rand -hex 32).")

LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"redact": {"()": "cesaflow.lib.redact.RedactingFilter"}},
    "formatters": {
        "plain": {"()": "cesaflow.lib.logs.PlainFormatter"},
        "json": {"()": "cesaflow.lib.logs.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "stream": sys.stderr,
            "formatter": LOG_FORMAT,
            # Second line of defence only: code must never log a secret in the first place.
            "filters": ["redact"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # httpx logs full URLs at INFO and headers at DEBUG through httpcore.
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}
