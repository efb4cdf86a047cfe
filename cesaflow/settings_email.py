"""Settings: outgoing email (README "Configuration"). SMTP when configured; else printed on the console in
development, and nowhere in production.

A block of ``cesaflow.settings`` in a module of its own so settings.py stays under 600 lines; settings.py imports it
(and nothing else should) after its environment helpers are defined.
"""

from __future__ import annotations

import os

from cesaflow.settings import PRODUCTION, _env_bool, _env_int

EMAIL_HOST = os.environ.get("CESAFLOW_EMAIL_HOST", "")
EMAIL_ENABLED = bool(EMAIL_HOST)
EMAIL_PORT = _env_int("CESAFLOW_EMAIL_PORT", 587, minimum=1)
EMAIL_HOST_USER = os.environ.get("CESAFLOW_EMAIL_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("CESAFLOW_EMAIL_PASSWORD", "")
EMAIL_USE_TLS = _env_bool("CESAFLOW_EMAIL_USE_TLS", True)
EMAIL_TIMEOUT = 10
DEFAULT_FROM_EMAIL = os.environ.get("CESAFLOW_EMAIL_FROM", "CesaFlow <noreply@localhost>")
if EMAIL_ENABLED:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
elif PRODUCTION:
    EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"  # nothing leaves; self-service sign-up is closed
else:
    # Development without SMTP: mail (sign-up confirmation links) is printed on the console of `make run`.
    EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"

__all__ = [
    "DEFAULT_FROM_EMAIL",
    "EMAIL_BACKEND",
    "EMAIL_ENABLED",
    "EMAIL_HOST",
    "EMAIL_HOST_PASSWORD",
    "EMAIL_HOST_USER",
    "EMAIL_PORT",
    "EMAIL_TIMEOUT",
    "EMAIL_USE_TLS",
]
