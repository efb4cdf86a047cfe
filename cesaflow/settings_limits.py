"""Settings: per-organization run caps and the monthly token cap's reservations (README "Security: limits").

A block of ``cesaflow.settings`` in a module of its own so settings.py stays under 600 lines. settings.py imports
it (and nothing else should), after its environment helpers are defined: the one place that reads the environment
is still the settings package.

Caps are counted in *slots*: a chat run takes one, an agent run ``RUN_AGENT_WEIGHT`` (it holds a workspace, runs
commands and makes many model calls). Completions of the OpenAI-compatible gateway are requests, not queued runs:
they take no executor slot, so they are not counted here (the per-org rate limits bound them).
"""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

from cesaflow.settings import _env_int

__all__ = ["RUN_AGENT_WEIGHT", "RUN_ORG_MAX_QUEUED", "RUN_ORG_MAX_RUNNING", "TOKEN_RESERVE_OUTPUT_TOKENS"]

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
