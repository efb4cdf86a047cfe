"""Settings: per-organization run caps and the monthly token cap's reservations (README "Security limits").

A block of ``cesaflow.settings`` in a module of its own so settings.py stays under 600 lines. settings.py imports
it (and nothing else should), after its environment helpers are defined: the one place that reads the environment
is still the settings package.

Caps are counted in *slots*: a chat run takes one, an agent run ``RUN_AGENT_WEIGHT`` (it holds a workspace, runs
commands and makes many model calls). Completions of the OpenAI-compatible gateway are requests, not queued runs:
they take no executor slot, so they are not counted here (the per-org rate limits bound them).

Rate limits (README "Rate limits", counted by ``cesaflow.lib.ratelimit``) are ``(requests, seconds)`` pairs read from
``CESAFLOW_RATE_LIMIT_*`` as ``"<requests>/<seconds>"``, or None when set to ``off``.
"""

from __future__ import annotations

import os

from django.core.exceptions import ImproperlyConfigured

from cesaflow.settings import _env_int

__all__ = [
    "RATE_LIMIT_API_KEY",
    "RATE_LIMIT_API_ORG",
    "RATE_LIMIT_API_UNAUTHENTICATED",
    "RATE_LIMIT_GATEWAY_KEY",
    "RATE_LIMIT_GATEWAY_ORG",
    "RATE_LIMIT_INVITATION",
    "RATE_LIMIT_LOGIN",
    "RATE_LIMIT_SIGNUP",
    "RUN_AGENT_WEIGHT",
    "RUN_ORG_MAX_QUEUED",
    "RUN_ORG_MAX_RUNNING",
    "TOKEN_RESERVE_OUTPUT_TOKENS",
]

# An org's chat and agent runs executing at once, in slots. More wait queued (and start in turn, never refused);
# executors claim round-robin across orgs, so one org's backlog cannot hold up another's runs.
RUN_ORG_MAX_RUNNING = _env_int("CESAFLOW_RUN_ORG_MAX_RUNNING", 8, minimum=1)
# An org's runs waiting to start, in slots: a run beyond it is refused (API 429 ``org_run_queue_full``).
RUN_ORG_MAX_QUEUED = _env_int("CESAFLOW_RUN_ORG_MAX_QUEUED", 50, minimum=1)
# The slots an agent run takes (a chat run takes one).
RUN_AGENT_WEIGHT = _env_int("CESAFLOW_RUN_AGENT_WEIGHT", 4, minimum=1)
if min(RUN_ORG_MAX_RUNNING, RUN_ORG_MAX_QUEUED) < RUN_AGENT_WEIGHT:
    raise ImproperlyConfigured(
        "CESAFLOW_RUN_AGENT_WEIGHT must not exceed CESAFLOW_RUN_ORG_MAX_RUNNING or CESAFLOW_RUN_ORG_MAX_QUEUED: "
        "an agent run could never start."
    )
# The output a provider call is assumed to produce when its request sets no max_tokens, for the token cap's
# reservation (runs.services.tokens). Chat runs and agent steps ask for 4,096 at most.
TOKEN_RESERVE_OUTPUT_TOKENS = _env_int("CESAFLOW_TOKEN_RESERVE_OUTPUT_TOKENS", 4096, minimum=1)


# --- Rate limits -------------------------------------------------------------------------------------


def _env_rate(name: str, default: str) -> tuple[int, int] | None:
    raw = os.environ.get(name, "").strip() or default
    if raw.lower() == "off":
        return None
    requests, slash, seconds = raw.partition("/")
    if not (slash and requests.strip().isdigit() and seconds.strip().isdigit()):
        raise ImproperlyConfigured(f"{name} must be '<requests>/<seconds>' (e.g. 60/60) or 'off', not {raw!r}.")
    rate = (int(requests), int(seconds))
    if min(rate) < 1:
        raise ImproperlyConfigured(f"{name}: requests and seconds must both be at least 1 (or say 'off').")
    return rate


# Per client IP. Sign-ups cost a password hash, a user and an organization each; sign-in attempts count successes
# too (the failed-login lock of orgs.login_guard still applies on top); invitation acceptance creates accounts.
RATE_LIMIT_SIGNUP = _env_rate("CESAFLOW_RATE_LIMIT_SIGNUP", "10/3600")
RATE_LIMIT_LOGIN = _env_rate("CESAFLOW_RATE_LIMIT_LOGIN", "60/60")
RATE_LIMIT_INVITATION = _env_rate("CESAFLOW_RATE_LIMIT_INVITATION", "30/3600")
# API and gateway calls per client IP without a valid credential (missing or bad key); past it, that IP's key
# calls are refused too until the window ends, so guessing cannot go on (security.md T22).
RATE_LIMIT_API_UNAUTHENTICATED = _env_rate("CESAFLOW_RATE_LIMIT_API_UNAUTHENTICATED", "60/60")
# The REST API per org API key (or signed-in user) and per organization.
RATE_LIMIT_API_KEY = _env_rate("CESAFLOW_RATE_LIMIT_API_KEY", "600/60")
RATE_LIMIT_API_ORG = _env_rate("CESAFLOW_RATE_LIMIT_API_ORG", "1200/60")
# The OpenAI-compatible gateway (chat completions and the model list) per org API key and per organization.
RATE_LIMIT_GATEWAY_KEY = _env_rate("CESAFLOW_RATE_LIMIT_GATEWAY_KEY", "600/60")
RATE_LIMIT_GATEWAY_ORG = _env_rate("CESAFLOW_RATE_LIMIT_GATEWAY_ORG", "3000/60")
