"""Settings of the floor proxy: bare Django, production-like (DEBUG off, no middleware, no database).

Configuration comes from the environment the benchmark sets (never from CesaFlow's settings):
``BENCH_FLOOR_TOKEN`` (the bearer a client must present) and ``BENCH_FLOOR_UPSTREAMS`` (JSON: label -> base URL).
"""

from __future__ import annotations

import json
import os
import secrets

SECRET_KEY = secrets.token_urlsafe(50)  # nothing is signed; Django only insists on having one
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "bench.floor.urls"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
# Like CesaFlow: httpx logs every request at INFO, which is an access log by another name.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}},
}

FLOOR_TOKEN = os.environ["BENCH_FLOOR_TOKEN"]
FLOOR_UPSTREAMS: dict[str, str] = json.loads(os.environ["BENCH_FLOOR_UPSTREAMS"])
