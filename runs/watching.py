"""Starting to watch a run (the SSE stream and the websocket): one database hop once the watcher is subscribed.

The watcher subscribes to the run's group first (an event published meanwhile is queued, not missed), then this
hop checks the credentials once more (a revocation committed before the subscription was not heard; for an org API
key verified recently that check is answered on the event loop, ``revalidate_cached``, under the authorization
generation read in the subscription's own round trip, ``subscribe``), takes the
run's snapshot and attaches a run that waits for its watcher (start on attach). Where this process executes runs
(the inline executor, with a free slot), the run is claimed for it in the attach's transaction and starts at once,
without a hand-over and a claim of its own. Each of these was a hop of its own; on the path to a run's first words
every hop counts (issue #13).

A run created through the REST API a moment ago, in this process, is usually watched next (an IDE creates it, then
opens its events on the same connection): ``remember_created`` keeps its row and the rows beside it (its provider
key, its creator) for a few seconds, generation-checked like the gateway's caches (``cesaflow.lib.row_cache``: any
change to a key, an org or a user, anywhere, and they are not trusted), so the attach starts from them instead of
reading the run. The run's own state needs no such check: the attach's update matches only a run still queued and
waiting for its watcher, and anything else is read from the database.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cesaflow.lib import row_cache
from cesaflow.lib.channel_layer import join_groups
from cesaflow.lib.hops import db_hop
from cesaflow.lib.row_cache import RowCache
from keys.models import ProviderKey
from orgs.authentication import KeyPrincipal, Principal, revalidate, revalidate_cached
from orgs.models import ApiKey, User
from orgs.tenancy import OrgContext
from runs.models import Run
from runs.selectors import run_get_for_org
from runs.services import Attached, run_attach

# Runs created here a moment ago, by org and id (``remember_created``): long enough for a client to open the stream.
_created = RowCache(ttl_s=10.0, max_entries=1024)


def remember_created(run: Run, *, token: str | None) -> None:
    """Keep a run just created and still waiting for its watcher, with ``token`` the authorization generation read
    *before* its provider key was (a change committed after that read replaces the token). Its creator comes from
    the request's authentication, read earlier: execution uses only its identity, as the audit record's actor."""
    if not run.waiting_for_watcher:
        return
    beside = (run.provider_key, run.created_by_user, run.created_by_api_key)
    _created.remember((run.org_id, run.id), [run, *(row for row in beside if row is not None)], token=token)


def created_here(run_id: uuid.UUID, *, org_id: uuid.UUID) -> bool:
    """Whether this process created ``run_id`` for ``org_id`` a moment ago (``remember_created``): the run is that
    org's, which no later change can undo, so a stream about to open needs no read to tell a 404 (deleted since,
    it finds no run and ends)."""
    return _created.holds((org_id, run_id))


def _recall_created(run_id: uuid.UUID, *, org_id: uuid.UUID, token: str | None) -> Run | None:
    instances = _created.recall((org_id, run_id), token=token)
    _created.forget((org_id, run_id))  # once: a second watcher finds the run attached, which the database says
    if not instances:
        return None
    run: Run = instances[0]
    for row in instances[1:]:
        if isinstance(row, ProviderKey):
            run.provider_key = row
        elif isinstance(row, User):
            run.created_by_user = row
        elif isinstance(row, ApiKey):
            run.created_by_api_key = row
    return run


@dataclass(frozen=True)
class WatchStart:
    refused: int | None  # the websocket close code when the credentials no longer hold (4401 / 4403)
    run: Run | None  # the snapshot (None: deleted meanwhile)
    claimed: bool = False  # claimed for the ``claim_for`` executor, which must execute it
    submitted: bool = False  # attached and committed, to be handed to the executors (by the caller: ``submit=False``)


def watch_start(
    *,
    principal: Principal,
    context: OrgContext,
    run_id: uuid.UUID,
    claim_for: str | None = None,
    revalidated: bool = False,
    created: Run | None = None,
    token: str | None = None,
    submit: bool = True,
) -> WatchStart:
    """Sync (database and session store); raises ``SessionStoreUnavailable`` like ``revalidate``. ``claim_for``:
    see ``run_attach``. ``revalidated``: the credentials were checked once more since the subscription already
    (``revalidate_cached``). ``created``: the run as the request that created it a moment ago holds it (a streamed
    ``POST /runs``), with everything execution reads: not read again when it is still waiting for its watcher.
    ``token``: the authorization generation read since the subscription; a run this process remembers having
    created (``remember_created``) under it is taken as ``created``. ``submit``: see ``run_attach``."""
    if not revalidated:
        refused = revalidate(principal, context)
        if refused is not None:
            return WatchStart(refused=refused, run=None)
    if created is None:
        created = _recall_created(run_id, org_id=context.org.id, token=token)
    if created is not None and created.id == run_id and created.org_id == context.org.id:
        attached = run_attach(run=created, claim_for=claim_for, submit=submit)
        if attached is not Attached.NOTHING:
            # It was queued and waiting for this watcher when the attach's update matched it: the instance held is
            # the run as it stands (updated in place), and its snapshot.
            return _started(created, attached)
        # No longer waiting (cancelled meanwhile, or not a watched run): the snapshot comes from the database.
    run = run_get_for_org(org=context.org, run_id=run_id)
    if run is None or run.is_terminal or run.attached_at is not None:
        return WatchStart(refused=None, run=run)
    return _started(run, run_attach(run=run, claim_for=claim_for, submit=submit))


def _started(run: Run, attached: Attached) -> WatchStart:
    return WatchStart(
        refused=None, run=run, claimed=attached is Attached.CLAIMED, submitted=attached is Attached.SUBMITTED
    )


async def subscribe(layer: Any, groups: Sequence[str], channel: str, *, principal: Principal) -> str | None:
    """Join a watcher's ``groups`` (the run's, the revocation signals'); for an org API key, return the
    authorization generation read after the join, in its round trip (``row_cache.ajoin_then_generation``): the
    ``token`` of ``awatch_start``. None for a session, whose verdict the hop reads."""
    if isinstance(principal, KeyPrincipal):
        return await row_cache.ajoin_then_generation(layer, groups, channel)
    await join_groups(layer, groups, channel)
    return None


async def awatch_start(
    *, principal: Principal, context: OrgContext, run_id: uuid.UUID, token: str | None, created: Run | None = None
) -> WatchStart:
    """``watch_start`` from the event loop, claiming the run for this process's executor when it has a slot. A run
    claimed for it is handed over even if the caller is cancelled meanwhile (its client left): once claimed, only
    this executor runs it; so is a run attached and not claimed here, to the executors (``runs.executor.submit``,
    from this loop: the caller's snapshot does not wait for the workers' nudge). ``token``: what ``subscribe``
    returned (read after the watcher joined its groups, never before). ``created``: see ``watch_start``."""
    from runs import executor  # the executor imports services; import at call time

    # An org API key (an IDE or a CLI, which creates a run and then watches it): its verdict and the run it
    # created come from this process's caches (no database read), under ``token``. A session's are read in the hop.
    cached = revalidate_cached(principal, context, token=token)
    if cached is not None and cached.refused is not None:
        return WatchStart(refused=cached.refused, run=None)
    local = executor.local_executor()
    if local is not None and not local.reserve_slot():
        local = None  # no free slot here: the run is handed over as usual
    # A hop of the loop's pool (``db_hop``), whole: a websocket has no request thread, and Channels' thread-sensitive
    # hop would queue every socket's attach on the process's one shared thread, behind the executor's claims and
    # purges (issue #13: the run stream's first words).
    hop = asyncio.ensure_future(
        db_hop(watch_start)(
            principal=principal,
            context=context,
            run_id=run_id,
            claim_for=local.worker_id if local else None,
            revalidated=cached is not None,
            created=created,
            token=token,
            submit=False,
        )
    )

    def hand_over(done: asyncio.Future[WatchStart]) -> None:
        start = None if done.cancelled() or done.exception() is not None else done.result()
        try:
            if local is not None:
                local.claimed_elsewhere(start.run if start is not None and start.claimed else None)
        finally:
            if start is not None and start.submitted:
                executor.submit(run_id)  # returns at once; an executor's poll finds the run anyway

    hop.add_done_callback(hand_over)
    return await asyncio.shield(hop)
