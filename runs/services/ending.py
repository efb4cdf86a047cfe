"""Ending runs: the end of a run (status, token totals, the usage ledger, the month's count; ``run_finish``, and
``runs_finish`` for many at once, which the gateway's writer uses: ``runs.api.run_ends``), and one provider call's
usage recorded as it happens (``run_usage_add``). Re-exported by ``runs.services``."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from cesaflow.lib.metrics import RUNS_FINISHED
from runs.models import TERMINAL_STATUSES, Run, UsageRecord
from runs.services.tokens import tokens_settle, tokens_used

MODEL_MAX_CHARS = 200


@dataclass(frozen=True)
class UsageEntry:
    """Token counts of one provider call, for the usage ledger."""

    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    complete: bool

    def counted(self) -> tuple[int, int]:
        """(input, output) tokens as billed: a provider's negative count is none."""
        return max(0, self.input_tokens), max(0, self.output_tokens)


def count_ended(run: Run) -> None:
    """``cesaflow_runs_finished_total``, once the end is committed."""
    kind, status = str(run.kind), str(run.status)
    transaction.on_commit(lambda: RUNS_FINISHED.labels(kind, status).inc())


# What ending a run reads and writes: every column a writer other than the run's own caller may change.
FINISH_COLUMNS: Final = (
    "status",
    "finished_at",
    "usage_complete",
    "error_kind",
    "error_message",
    "input_tokens",
    "output_tokens",
    "tokens_reserved",
    "tokens_reserved_month",
)


@dataclass(frozen=True)
class RunEnd:
    """How one run ended, for ``runs_finish``: its terminal ``status``, one usage entry per provider call not
    recorded yet, and ``usage_complete`` (default: every entry complete, and at least one).

    ``held_run``: the instance of run ``run_id`` the caller created in this request (the gateway). Under the row
    lock only the columns another writer may have changed since (``FINISH_COLUMNS``: a cancel, the reaper, usage
    recorded meanwhile) are read again, into it, instead of the whole row; the same instance is returned."""

    run_id: uuid.UUID
    status: str
    usage: list[UsageEntry]
    usage_complete: bool | None = None
    error_kind: str = ""
    error_message: str = ""
    held_run: Run | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.status not in TERMINAL_STATUSES:
            raise ValueError(f"not a terminal status: {self.status!r}")


def run_finish(
    *,
    run_id: uuid.UUID,
    status: str,
    usage: list[UsageEntry],
    usage_complete: bool | None = None,
    error_kind: str = "",
    error_message: str = "",
    held_run: Run | None = None,
) -> Run:
    """Record the end of one run (``runs_finish``, which see)."""
    end = RunEnd(run_id, status, usage, usage_complete, error_kind, error_message, held_run)
    run = runs_finish([end]).get(run_id)
    if run is None:
        raise Run.DoesNotExist(f"no run {run_id}")
    return run


def _refreshed(run: Run, values: Sequence[Any]) -> Run:
    for column, value in zip(FINISH_COLUMNS, values, strict=True):
        setattr(run, column, value)
    return run


@transaction.atomic
def runs_finish(ends: Sequence[RunEnd]) -> dict[uuid.UUID, Run]:
    """Record the end of runs: status, times, token totals and one usage-ledger row per provider call. The
    usage counts against the org's monthly cap, and what is left of each run's reservation is released. One
    transaction for all of them: the rows locked in one statement (in id order), one ``UPDATE`` per budget row,
    one ``INSERT`` of the ledger rows, and the runs' updates (one statement for several runs on PostgreSQL), so
    that a process ending many runs at once (the gateway's writer, ``runs.api.run_ends``) pays for a handful of
    statements, not a handful per run. Returns the runs by id; an end whose run does not exist is left out.

    Idempotent: a run that already ended (reaped, cancelled while queued) keeps its first outcome, but the
    usage of calls that really happened is still recorded, because the provider bills them. At most one end per
    run in one call."""
    by_id = {end.run_id: end for end in ends}
    if len(by_id) != len(ends):
        raise ValueError("one end per run")
    locked = Run.objects.select_for_update().filter(id__in=by_id).order_by("id")
    held = {end.run_id: end.held_run for end in ends if end.held_run is not None and end.held_run.id == end.run_id}
    runs: dict[uuid.UUID, Run] = {}
    if len(held) == len(ends):
        for run_id, *columns in locked.values_list("id", *FINISH_COLUMNS):
            runs[run_id] = _refreshed(held[run_id], columns)
    else:
        for row in locked:
            fresh = [getattr(row, column) for column in FINISH_COLUMNS]
            runs[row.id] = _refreshed(held[row.id], fresh) if row.id in held else row
    if not runs:
        return runs

    totals = {run_id: _totals(by_id[run_id].usage) for run_id in runs}
    tokens_settle([(run, sum(totals[run.id])) for run in runs.values()])
    UsageRecord.objects.bulk_create([_ledger_row(run, entry) for run in runs.values() for entry in by_id[run.id].usage])
    now = timezone.now()
    fields = ["input_tokens", "output_tokens", "tokens_reserved", "tokens_reserved_month"]
    for run in runs.values():
        end = by_id[run.id]
        input_tokens, output_tokens = totals[run.id]
        run.input_tokens += input_tokens
        run.output_tokens += output_tokens
        if not run.is_terminal:
            run.status = end.status
            run.finished_at = now
            run.usage_complete = (
                end.usage_complete
                if end.usage_complete is not None
                else bool(end.usage) and all(e.complete for e in end.usage)
            )
            run.error_kind = end.error_kind[:32]
            run.error_message = end.error_message[:300]
            fields += ["status", "finished_at", "usage_complete", "error_kind", "error_message"]
            count_ended(run)
    # Every written column is one of FINISH_COLUMNS, read under the lock: a run already over writes back its own.
    _runs_write(list(runs.values()), list(dict.fromkeys(fields)))
    return runs


def _totals(entries: list[UsageEntry]) -> tuple[int, int]:
    counts = [entry.counted() for entry in entries]
    return sum(count[0] for count in counts), sum(count[1] for count in counts)


def _ledger_row(run: Run, entry: UsageEntry) -> UsageRecord:
    input_tokens, output_tokens = entry.counted()
    return UsageRecord(
        org_id=run.org_id,
        run_id=run.id,
        provider=entry.provider,
        model=entry.model[:MODEL_MAX_CHARS],
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        complete=entry.complete,
    )


def _runs_write(runs: list[Run], fields: list[str]) -> None:
    """``fields`` of each of ``runs`` (their own values per run) in one ``UPDATE … FROM UNNEST(…)``, a column
    array per field as Django 5.2 itself sends a ``bulk_create``. Not ``bulk_update``: its ``CASE WHEN`` per field
    and run costs more to build than the statements it saves (a batch of 50 runs took 1.7 s of a 1.8 s profile of
    ending them); not ``save()`` per run: a statement each. No signal is sent, as by ``bulk_update``: nothing
    listens to a run's saves.

    One run (a run ended by its executor), or SQLite (``make run``'s database, which has no ``UNNEST``): each run's
    ``save``, as before batches."""
    if len(runs) == 1 or connection.vendor != "postgresql":
        for run in runs:
            run.save(update_fields=fields)
        return
    meta = Run._meta
    quote = connection.ops.quote_name
    by_name = {field.name: field for field in meta.concrete_fields}
    written = [by_name["id"], *(by_name[name] for name in fields)]
    names = [quote(field.column) for field in written]
    arrays = ", ".join(f"%s::{field.db_type(connection)}[]" for field in written)
    assignments = ", ".join(f"{name} = v.{name}" for name in names[1:])
    # The names come from the model, the values are bound.
    sql = f"UPDATE {quote(meta.db_table)} AS r SET {assignments} FROM UNNEST({arrays}) AS v({', '.join(names)})"  # noqa: S608
    values = [[field.get_db_prep_save(getattr(run, field.attname), connection) for run in runs] for field in written]
    with connection.cursor() as cursor:
        cursor.execute(f"{sql} WHERE r.{names[0]} = v.{names[0]}", values)


@transaction.atomic
def run_usage_add(*, run_id: uuid.UUID, entry: UsageEntry) -> None:
    """One provider call's usage, recorded as it happens (agent runs make many calls): a ledger row, the run's
    totals, and the org's monthly count (that much of the run's reservation is used up). ``run_finish`` later adds
    only what was not recorded yet."""
    run = (
        Run.objects.select_for_update().only("id", "org_id", "tokens_reserved", "tokens_reserved_month").get(id=run_id)
    )
    input_tokens, output_tokens = entry.counted()
    if tokens_used(run=run, tokens=input_tokens + output_tokens):
        run.save(update_fields=["tokens_reserved", "tokens_reserved_month"])
    _ledger_row(run, entry).save(force_insert=True)
    Run.objects.filter(id=run_id).update(
        input_tokens=F("input_tokens") + input_tokens, output_tokens=F("output_tokens") + output_tokens
    )
