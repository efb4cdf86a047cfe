"""The monthly token cap, kept so that parallel calls cannot overshoot it.

Each org has one ``TokenBudget`` row per calendar month (UTC): ``used``, what its provider calls reported (kept in
step with the usage ledger, in the same transactions), and ``reserved``, what calls in flight may still spend.
Before a call its estimate is reserved with one conditional UPDATE of that row::

    UPDATE runs_tokenbudget SET reserved = reserved + :estimate
     WHERE org_id = :org AND month = :month AND used <= :cap - :estimate - reserved

Concurrent reservations of an org queue on the row's lock, and PostgreSQL re-checks the condition against the row
as the previous writer left it, so N parallel calls can never together reserve past the cap. When a call reports
its usage, that much of its run's reservation turns into ``used``; when the run ends, whatever the ending
(succeeded, failed, cancelled, not watched, lost), the rest is released. PostgreSQL rather than Redis: a counter
that vanished with Redis would reopen the cap.

The estimate is what a call can cost at most: its prompt's size in UTF-8 bytes (the providers' byte-level
tokenizers never make more tokens than bytes) plus the output it may produce (its ``max_tokens``;
``TOKEN_RESERVE_OUTPUT_TOKENS`` when a proxy request sets none). Chat runs reserve their one call at creation.
Agent runs reserve each model call before making it: the previous call's input and output (the conversation it
resends), ``AGENT_STEP_ALLOWANCE_TOKENS`` for the tool results added since, and the output limit. Only what
exceeds an estimate (a proxy call without max_tokens whose provider writes more, an agent step whose tool results
are larger than the allowance) can pass the cap, and only by that call's excess.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F, Value
from django.db.models.functions import Greatest
from django.utils import timezone

from orgs.models import Organization
from runs.models import Run, RunKind, TokenBudget
from runs.selectors import tokens_used_in_month

TOKEN_CAP_REACHED = "token_cap_reached"  # noqa: S105 - an error code, not a secret

# What chat runs and agent steps ask a provider for at most (their max_tokens).
CALL_MAX_OUTPUT_TOKENS = 4096
# A chat run's system prompt and the message framing around its objective.
CHAT_PROMPT_OVERHEAD_TOKENS = 256
# An agent's system prompt and tool definitions, sent with every model call.
AGENT_PROMPT_OVERHEAD_TOKENS = 4096
# The tool results an agent step adds to the conversation before the next model call.
AGENT_STEP_ALLOWANCE_TOKENS = 8192


def budget_month(now: datetime | None = None) -> date:
    """The first day of the calendar month (UTC) that ``now`` (default: now) is in."""
    return (now or timezone.now()).astimezone(UTC).date().replace(day=1)


def tokens_estimate(*, prompt_bytes: int, max_output_tokens: int | None = None) -> int:
    """The most a provider call can cost in tokens: ``prompt_bytes`` (the UTF-8 size of everything it sends)
    plus ``max_output_tokens`` (``TOKEN_RESERVE_OUTPUT_TOKENS`` when the request sets no limit)."""
    output = max_output_tokens if max_output_tokens and max_output_tokens > 0 else settings.TOKEN_RESERVE_OUTPUT_TOKENS
    return max(0, prompt_bytes) + int(output)


def run_first_call_estimate(*, kind: str, objective: str) -> int:
    """What the first provider call of a new run can cost (``run_create`` reserves it). A proxy completion's
    caller knows better (its prompt and max_tokens) and passes its own estimate; without one, the default output."""
    if kind == RunKind.COMPLETION:
        return tokens_estimate(prompt_bytes=0)
    overhead = AGENT_PROMPT_OVERHEAD_TOKENS if kind == RunKind.AGENT else CHAT_PROMPT_OVERHEAD_TOKENS
    return tokens_estimate(prompt_bytes=len(objective.encode()) + overhead, max_output_tokens=CALL_MAX_OUTPUT_TOKENS)


def agent_step_estimate(*, last_input_tokens: int, last_output_tokens: int) -> int:
    """What an agent's next model call can cost, from what the previous one used (0, 0 before the first)."""
    resent = max(0, last_input_tokens) + max(0, last_output_tokens) + AGENT_STEP_ALLOWANCE_TOKENS
    return resent + CALL_MAX_OUTPUT_TOKENS


def _budget(org_id: uuid.UUID, month: date) -> None:
    """Make sure the org's row for ``month`` exists. A new row starts from the ledger's total for the month; call
    this before inserting ledger rows in the same transaction, or they would be counted twice."""
    if not TokenBudget.objects.filter(org_id=org_id, month=month).exists():
        # A concurrent creation makes this one wait and then find the row (get_or_create's retry).
        TokenBudget.objects.get_or_create(
            org_id=org_id, month=month, defaults={"used": tokens_used_in_month(org_id=org_id, month=month)}
        )


def _refusal(org_id: uuid.UUID, month: date, cap: int, estimate: int) -> ValidationError:
    row = TokenBudget.objects.filter(org_id=org_id, month=month).values_list("used", "reserved").first()
    used, reserved = row or (0, 0)
    message = f"This organization has used {used:,} of its {cap:,} monthly tokens."
    if used < cap:
        message += (
            f" Runs in progress may still use {reserved:,} more, and this one could need up to {estimate:,}: "
            "try again once they have finished."
        )
    return ValidationError(f"{message} An Admin can raise the cap in Settings.", code=TOKEN_CAP_REACHED)


def tokens_reserve(*, org: Organization, estimate: int) -> date | None:
    """Reserve ``estimate`` tokens of the org's monthly cap for a call about to start; the month reserved in, or
    None when the org has no cap (nothing to reserve). Raises ``ValidationError`` (code ``token_cap_reached``)
    when the cap has no room for it. Call inside the transaction that records the reservation on its run."""
    cap = org.monthly_token_cap
    if cap is None:
        return None
    month = budget_month()
    _budget(org.id, month)
    if not _reserve(org.id, month, cap, estimate):
        raise _refusal(org.id, month, cap, estimate)
    return month


def _reserve(org_id: uuid.UUID, month: date, cap: int, amount: int) -> bool:
    # One statement, the condition on the row itself (no subquery): PostgreSQL re-evaluates it on the latest
    # version of the row after waiting for a concurrent writer.
    return (
        TokenBudget.objects.filter(org_id=org_id, month=month, used__lte=Value(cap - amount) - F("reserved")).update(
            reserved=F("reserved") + amount
        )
        == 1
    )


@transaction.atomic
def run_tokens_top_up(*, run_id: uuid.UUID, estimate: int) -> bool:
    """Before an agent's model call: make the run's reservation at least ``estimate``. False when the org's cap
    has no room for it (the call must not start). The run's row is locked first, like every path that changes a
    reservation, then the budget's."""
    run = Run.objects.select_for_update().get(id=run_id)
    cap = Organization.objects.filter(id=run.org_id).values_list("monthly_token_cap", flat=True).first()
    if cap is None:
        return True
    month = budget_month()
    fields = tokens_release(run=run) if run.tokens_reserved_month not in (None, month) else []
    needed = estimate - run.tokens_reserved
    if needed > 0:
        _budget(run.org_id, month)
        if not _reserve(run.org_id, month, cap, needed):
            if fields:
                run.save(update_fields=fields)
            return False
        run.tokens_reserved += needed
        run.tokens_reserved_month = month
        fields += ["tokens_reserved", "tokens_reserved_month"]
    if fields:
        run.save(update_fields=list(dict.fromkeys(fields)))
    return True


def tokens_used(*, run: Run, tokens: int) -> list[str]:
    """``tokens`` reported by a call of ``run`` (its row locked by the caller): added to this month's ``used``, and
    that much of the run's reservation released. Call before inserting the ledger rows (see ``_budget``); returns
    the run's changed fields for the caller's save."""
    if tokens <= 0:
        return []
    month = budget_month()
    counted = TokenBudget.objects.filter(org_id=run.org_id, month=month)
    if not counted.update(used=F("used") + tokens):
        _budget(run.org_id, month)  # the month's first usage: the row starts from the ledger, without these
        counted.update(used=F("used") + tokens)
    taken = min(tokens, run.tokens_reserved)
    if taken <= 0:
        return []
    _unreserve(run, taken)
    return ["tokens_reserved", "tokens_reserved_month"]


def tokens_release(*, run: Run) -> list[str]:
    """Release what is left of ``run``'s reservation (its row locked by the caller): the run ended, or no call
    will use it. Returns the run's changed fields for the caller's save."""
    if run.tokens_reserved <= 0:
        return []
    _unreserve(run, run.tokens_reserved)
    return ["tokens_reserved", "tokens_reserved_month"]


def tokens_settle(settled: Sequence[tuple[Run, int]]) -> None:
    """Runs that end (their rows locked by the caller), each with the tokens its calls reported and not yet
    counted: what ``tokens_used`` then ``tokens_release`` do for one run, for all of them with one ``UPDATE`` per
    budget row (an org's month), taken in (org, month) order so that writers ending runs of several orgs lock
    those rows in one order. Call before inserting the ledger rows (see ``_budget``); each run's
    ``tokens_reserved`` and ``tokens_reserved_month`` are changed in place, for the caller's save."""
    month = budget_month()
    used: dict[tuple[uuid.UUID, date], int] = defaultdict(int)
    released: dict[tuple[uuid.UUID, date], int] = defaultdict(int)
    for run, tokens in settled:
        if tokens > 0:
            used[run.org_id, month] += tokens
        if run.tokens_reserved > 0 and run.tokens_reserved_month is not None:
            released[run.org_id, run.tokens_reserved_month] += run.tokens_reserved
        run.tokens_reserved, run.tokens_reserved_month = 0, None
    for org_id, row_month in sorted(used.keys() | released.keys()):
        changes: dict[str, Any] = {}
        if amount := used.get((org_id, row_month)):
            changes["used"] = F("used") + amount
        if amount := released.get((org_id, row_month)):
            # Greatest: a row that somehow holds less than the runs believe must not turn their ending into an error.
            changes["reserved"] = Greatest(F("reserved") - amount, 0)
        row = TokenBudget.objects.filter(org_id=org_id, month=row_month)
        if not row.update(**changes) and "used" in changes:
            _budget(org_id, row_month)  # the month's first usage: the row starts from the ledger, without these
            row.update(**changes)


def _unreserve(run: Run, amount: int) -> None:
    if run.tokens_reserved_month is not None:
        # Greatest: a row that somehow holds less than the run believes must not turn a run's ending into an error.
        TokenBudget.objects.filter(org_id=run.org_id, month=run.tokens_reserved_month).update(
            reserved=Greatest(F("reserved") - amount, 0)
        )
    run.tokens_reserved -= amount
    if run.tokens_reserved == 0:
        run.tokens_reserved_month = None
