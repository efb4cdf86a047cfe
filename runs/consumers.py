"""Websockets for live runs: ``/ws/runs/<uuid>/`` (one run's events) and ``/ws/org/runs/`` (status changes of the
org's runs, for live lists).

Authentication and authorization happen in ``connect``, through the one authentication path
(``orgs.authentication.principal_for_scope``: the session token cookie, or an org API key in a handshake header).
The Origin is checked before (``AllowedHostsOriginValidator`` in ``cesaflow.asgi``). Refusals accept and then close
with a code, so clients can tell them apart: 4401 no or bad credentials, 4403 lacking ``runs:read`` or the org
suspended by the CesaFlow operators, 4404 a run
that is missing or another org's (the same answer), or a signed-in user of no organization; 4503 when sessions
cannot be checked (the session store is down). Groups are derived server-side from the caller's org and the run id
in the path only; a run socket forwards nothing of its run's group until the run is found to be the caller's org's.

An open socket keeps checking: on every revocation signal for its org or its user (``orgs.revocation``) and at
least every ``STREAM_REVALIDATE_SECONDS`` it re-runs the check, and closes with 4401 (the key or session is gone)
or 4403 (the member was removed or demoted below ``runs:read``, or the org suspended). Closing never stops the run.

Protocol (JSON text frames; the schema is ``runs.events``):

* server → client: on connect to a run, its current ``run.status`` (``seq`` 0: metadata and token counts, never
  past content) and, for a finished run, a ``run.finished`` (``seq`` 0); then the live events as the executor
  publishes them. A watched run waiting for its watcher starts once this socket is subscribed (start on attach),
  so its first words cannot be missed. The org socket sends ``run.status`` events of every run of the org.
* client → server: ``{"type": "cancel"}`` cancels the run if the caller has ``runs:write`` (otherwise ignored);
  anything else is ignored. Binary frames close with 4415, frames over 4 KiB with 4413 (not RFC 6455's 1003 and
  1009, which daphne's websocket library cannot send).

When the server process shuts down gracefully, open sockets close with 4503 (try again): reconnect (to another
process) and the current status arrives as on any connect.

Closing the socket never stops the run: it keeps running for whoever else watches, and records its usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from contextlib import suppress
from typing import Any

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.core.exceptions import ValidationError

from cesaflow.lib import shutdown
from cesaflow.lib.channel_layer import join_groups
from cesaflow.lib.metrics import ACTIVE_STREAMS
from orgs import revocation
from orgs.authentication import (
    CLOSE_FORBIDDEN,
    CLOSE_UNAUTHENTICATED,
    AuthenticationError,
    Principal,
    SessionPrincipal,
    aprincipal_and_context_for_scope,
    context_now,
    revalidate,
)
from orgs.permissions import RUNS_READ, RUNS_WRITE
from orgs.sessions.store import SessionStoreUnavailable
from orgs.tenancy import OrgContext
from runs import events
from runs.models import Run
from runs.selectors import run_get_for_org
from runs.services import run_request_cancel
from runs.watching import WatchStart, awatch_start, subscribe

logger = logging.getLogger("cesaflow.runs")

CLOSE_NOT_FOUND = 4404
# Reconnect later: the session store is down, or this process is shutting down (``cesaflow.lib.shutdown``). Not
# 1013/1012: daphne's websocket library (autobahn) sends only 1000 and 3000-4999 and raises on any other code, so a
# socket refused with 1013 was accepted and then left open without a frame (found by the deployment drill:
# websockets opened while Redis restarted hung).
CLOSE_TRY_AGAIN_LATER = shutdown.CLOSE_TRY_AGAIN_LATER
CLOSE_UNSUPPORTED_DATA = 4415
CLOSE_TOO_BIG = 4413
MAX_CLIENT_MESSAGE_CHARS = 4096


class _RunEventsConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]  # channels is untyped
    """Shared by both sockets: forwards ``run.event`` messages of the groups joined in ``connect``, and keeps
    re-checking the caller's credentials while open."""

    org_context: OrgContext | None = None
    principal: Principal | None = None
    forwarding = False  # run events go to the client (once its right to them is established)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._joined: list[str] = []
        self._recheck: asyncio.Task[None] | None = None
        self._counted = False  # in cesaflow_active_streams

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Channels' own dispatch, without the thread hop it makes before every handler (``aclose_old_connections``,
        Channels 4.2+: ``close_old_connections`` in the process's one shared thread-sensitive thread). These sockets
        touch the database only through ``db_hop`` (which hands its connection back) and ``database_sync_to_async``
        (which closes that thread's old connections around each call itself), so the hop had nothing to clean; yet
        the handshake and every run event waited for it, behind whatever else that thread was doing (issue #13: the
        run stream's first words)."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def refuse(self, code: int) -> None:
        # Accept first: a close before the handshake completes reaches the browser as a bare 1006.
        await self.accept()
        await self.close(code=code)

    async def authorize(self) -> OrgContext | None:
        """The caller's org context if it may read runs; otherwise the socket is refused and None returned."""
        principal: Principal | None
        context: OrgContext | None
        try:
            principal, context = await aprincipal_and_context_for_scope(self.scope)
        except AuthenticationError:
            await self.refuse(CLOSE_UNAUTHENTICATED)
            return None
        except SessionStoreUnavailable:
            await self.refuse(CLOSE_TRY_AGAIN_LATER)
            return None
        if principal is None:
            await self.refuse(CLOSE_UNAUTHENTICATED)
            return None
        if context is None:
            # A signed-in user of no organization gets what the API gives them: nothing here is theirs.
            await self.refuse(CLOSE_NOT_FOUND)
            return None
        if context.org.is_suspended or not context.can(RUNS_READ):
            await self.refuse(CLOSE_FORBIDDEN)
            return None
        self.principal, self.org_context = principal, context
        return context

    async def join_revocations(self, *also: str, watching: bool = False) -> str | None:
        """Listen for revocation signals (before the check that follows ``connect``'s, so none is missed), and join
        the groups ``also`` names in the same round trip. ``watching``: a run's watcher, which gets the token its
        ``awatch_start`` needs read with the join (``runs.watching.subscribe``); None otherwise."""
        if self.principal is None or self.org_context is None:
            return None
        groups = [*also, revocation.org_group(self.org_context.org.pk)]
        if isinstance(self.principal, SessionPrincipal):
            groups.append(revocation.user_group(self.principal.user.pk))
        if not watching:
            await self.join(*groups)
            return None
        token = await subscribe(self.channel_layer, groups, self.channel_name, principal=self.principal)
        self._joined.extend(groups)
        return token

    async def watch_credentials(self) -> None:
        """After accepting: listen for revocation signals, check once more, then re-check on a timer."""
        await self.join_revocations()
        # A revocation committed between the check in connect and joining the groups was not heard: look once more.
        if not await self.credentials_revoked():
            self.recheck_periodically()

    def recheck_periodically(self) -> None:
        """The socket is open and authorized: keep checking it, and close it when the process shuts down."""
        self._recheck = asyncio.create_task(self._recheck_periodically())
        if not self._counted:
            self._counted = True
            ACTIVE_STREAMS.labels("websocket").inc()

    async def _recheck_periodically(self) -> None:
        closing = asyncio.ensure_future(shutdown.streams_closing())
        try:
            while True:
                done, _ = await asyncio.wait({closing}, timeout=float(settings.STREAM_REVALIDATE_SECONDS))
                if done:
                    # Graceful shutdown: the client reconnects (to another process) and gets the current status.
                    await self.close(code=CLOSE_TRY_AGAIN_LATER, reason="server restarting")
                    return
                if await self.credentials_revoked():
                    return
        finally:
            closing.cancel()

    async def credentials_revoked(self) -> bool:
        """Re-checks the credentials; closes the socket (4401/4403) and returns True if they no longer hold."""
        if self.principal is None or self.org_context is None:
            return False
        try:
            code = await database_sync_to_async(revalidate)(self.principal, self.org_context)
        except Exception:
            # Fail closed: credentials that cannot be checked (the session store or the database is down) are not
            # trusted, and the timer must never die silently and leave the socket unchecked.
            logger.warning("websocket credentials could not be re-checked; closing", exc_info=True)
            code = CLOSE_UNAUTHENTICATED
        if code is None:
            return False
        logger.info("websocket closed with %s: credentials revoked", code)
        self.principal = None
        await self.close(code=code)
        return True

    async def auth_revalidate(self, message: dict[str, Any]) -> None:
        """A revocation signal (``orgs.revocation``): check now."""
        await self.credentials_revoked()

    async def join(self, *groups: str) -> None:
        await join_groups(self.channel_layer, groups, self.channel_name)  # one round trip for all
        self._joined.extend(groups)

    async def disconnect(self, code: int) -> None:
        if self._counted:
            self._counted = False
            ACTIVE_STREAMS.labels("websocket").dec()
        if self._recheck is not None:
            self._recheck.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self._recheck
            self._recheck = None
        await self.leave_groups()

    async def leave_groups(self) -> None:
        joined, self._joined = self._joined, []
        for group in joined:
            with suppress(Exception):  # Redis away: leave the others (and this process's own registry) anyway
                await self.channel_layer.group_discard(group, self.channel_name)

    async def send_event(self, event: dict[str, Any] | events.RunEvent) -> None:
        await self.send(text_data=json.dumps(event, separators=(",", ":")))

    # Channel-layer handlers ------------------------------------------------------------------------------------

    async def run_event(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        if self.forwarding and isinstance(event, dict):
            await self.send_event(event)

    async def run_cancel(self, message: dict[str, Any]) -> None:
        """Cancel signals travel on the run's group too; they are for executors, not clients."""


class RunConsumer(_RunEventsConsumer):
    """``/ws/runs/<uuid:run_id>/``: one run's live events."""

    run_id: uuid.UUID | None = None

    async def connect(self) -> None:
        context = await self.authorize()
        if context is None or self.principal is None:
            return
        run_id: uuid.UUID = self.scope["url_route"]["kwargs"]["run_id"]
        # Join before taking the snapshot: an event published in between is then queued for us, not missed. The
        # run's group is joined before the run is looked up (in the hop below, so the run is read once on the path
        # to its first words): nothing is forwarded until it is found to be the caller's org's (``forwarding``).
        token = await self.join_revocations(events.run_group(run_id), watching=True)
        await self.accept()
        # One hop: the credentials once more, the snapshot, and start on attach (now that this socket receives the
        # run's events, a waiting run may call the provider, and an unwatched one is recorded as watched).
        try:
            start = await awatch_start(principal=self.principal, context=context, run_id=run_id, token=token)
        except Exception:
            logger.warning("websocket credentials could not be re-checked; closing", exc_info=True)
            start = WatchStart(refused=CLOSE_UNAUTHENTICATED, run=None)  # fail closed
        if start.refused is not None:
            logger.info("websocket closed with %s: credentials revoked", start.refused)
            self.principal = None
            await self.close(code=start.refused)
            return
        if start.run is None:  # missing, or another org's: the same answer
            await self.leave_groups()
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.run_id = start.run.id
        self.forwarding = True
        self.recheck_periodically()
        await self.send_event(events.status_event(start.run))
        if start.run.is_terminal:
            await self.send_event(events.finished_event(start.run, seq=0))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            await self.close(code=CLOSE_UNSUPPORTED_DATA)
            return
        if len(text_data) > MAX_CLIENT_MESSAGE_CHARS:
            await self.close(code=CLOSE_TOO_BIG)
            return
        try:
            message = json.loads(text_data)
        except ValueError:
            return
        if isinstance(message, dict) and message.get("type") == "cancel":
            await self._cancel()

    async def _cancel(self) -> None:
        # Authorize again: the socket may have been open for a while, and the rights since reduced.
        if self.run_id is None or self.principal is None or self.org_context is None:
            return
        if await self.credentials_revoked():
            return
        await database_sync_to_async(_cancel_run)(
            principal=self.principal, org_id=str(self.org_context.org.pk), run_id=self.run_id
        )


def _cancel_run(*, principal: Principal, org_id: str, run_id: uuid.UUID) -> Run | None:
    context = context_now(principal, org_id=org_id)
    if context is None or not context.can(RUNS_WRITE):
        return None
    run = run_get_for_org(org=context.org, run_id=run_id)
    if run is None:
        return None
    logger.info("run %s cancel requested over websocket", run.id)
    try:
        return run_request_cancel(run=run, actor=context.actor)
    except ValidationError:
        return None  # not cancellable from here (a proxy call): nothing to do


class OrgRunsConsumer(_RunEventsConsumer):
    """``/ws/org/runs/``: status changes (``run.status``) of every run of the caller's org."""

    async def connect(self) -> None:
        context = await self.authorize()
        if context is None:
            return
        await self.join(events.org_runs_group(context.org.id))
        self.forwarding = True
        await self.accept()
        await self.watch_credentials()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            await self.close(code=CLOSE_UNSUPPORTED_DATA)
        elif len(text_data) > MAX_CLIENT_MESSAGE_CHARS:
            await self.close(code=CLOSE_TOO_BIG)
        # Nothing else to say on this socket.
