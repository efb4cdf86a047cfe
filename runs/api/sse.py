"""``GET /api/v1/runs/{id}/events``: a run's live events as Server-Sent Events, for IDEs and CLIs (``curl -N``).

The request goes through the API's tenant gate (``OrgAPIView``: org API key or session, ``runs:read``; another
org's run is a 404 JSON error, before anything streams). The body is an async generator that Django streams on
the server's event loop, subscribed to the run's channel-layer group::

    event: run.status
    id: 0
    data: {"type":"run.status","run_id":"…","seq":0,"status":"running",…}

    event: text.delta
    id: 3
    data: {"type":"text.delta","run_id":"…","seq":3,"text":"Hello"}

    : keep-alive

The same event JSON as the websocket (``runs.events``): first the run's current status (``seq`` 0, metadata and
token counts only: past text is never replayed), then live events; a ``: keep-alive`` comment every
``SSE_KEEPALIVE_SECONDS``; the stream ends after ``run.finished``. While open it re-checks the caller's
credentials on every revocation signal (``orgs.revocation``) and at least every ``STREAM_REVALIDATE_SECONDS``: a
revoked key, an ended session or a member removed or demoted below ``runs:read`` ends the stream with an
``error`` event (kind ``credentials_revoked``, ``seq`` 0); the run itself goes on. An already finished run gets
its status and a ``run.finished`` (both ``seq`` 0) and the stream ends. A watched run waiting for its watcher
starts once the stream is subscribed (start on attach). Hanging up does not stop the run. When the server process
shuts down gracefully, the stream ends with an ``error`` event of kind ``server_restarting`` (``retryable``: open
the stream again, on another process; the run goes on).

``POST /api/v1/runs`` with ``"stream": true`` (or ``Accept: text/event-stream``) answers with this same stream for
the run it creates (``runs.api.views``), so a client cannot miss its first words.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import suppress
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request

from cesaflow.lib import shutdown
from cesaflow.lib.api import error_responses
from cesaflow.lib.metrics import ACTIVE_STREAMS
from orgs import revocation
from orgs.api.base import OrgAPIView
from orgs.authentication import CLOSE_UNAUTHENTICATED, Principal, SessionPrincipal, revalidate
from orgs.models import Actor, Organization
from orgs.permissions import RUNS_READ
from orgs.tenancy import OrgContext
from runs import events
from runs.models import Run
from runs.selectors import run_get_for_org
from runs.services import run_request_cancel
from runs.watching import WatchStart, awatch_start, created_here, subscribe

logger = logging.getLogger("cesaflow.runs")

KEEPALIVE = b": keep-alive\n\n"


def sse_frame(event: dict[str, Any] | events.RunEvent) -> bytes:
    data = json.dumps(event, separators=(",", ":"))  # one line: JSON escapes newlines inside strings
    return f"event: {event['type']}\nid: {event['seq']}\ndata: {data}\n\n".encode()


def _restarting_frame(run_id: uuid.UUID) -> bytes:
    event: events.ErrorEvent = {
        "type": "error",
        "run_id": str(run_id),
        "seq": 0,
        "kind": shutdown.RESTARTING_KIND,
        "message": shutdown.RESTARTING_MESSAGE,
        "retryable": True,
    }
    return sse_frame(event)


def _revoked_frame(run_id: uuid.UUID) -> bytes:
    event: events.ErrorEvent = {
        "type": "error",
        "run_id": str(run_id),
        "seq": 0,
        "kind": "credentials_revoked",
        "message": "Your access to this run was revoked; the run itself goes on.",
        "retryable": False,
    }
    return sse_frame(event)


async def _still_allowed(principal: Principal, context: OrgContext) -> bool:
    try:
        return await database_sync_to_async(revalidate)(principal, context) is None
    except Exception:
        logger.warning("stream credentials could not be re-checked; ending the stream", exc_info=True)
        return False  # fail closed


async def run_event_stream(
    *,
    context: OrgContext,
    principal: Principal,
    run_id: uuid.UUID,
    keepalive_s: float,
    cancel_on_disconnect: Actor | None = None,
    created: Run | None = None,
) -> AsyncIterator[bytes]:
    """The SSE body for one run (already authorized: ``principal`` in ``context``). A watched run waiting for its
    watcher starts once this stream is subscribed (start on attach). ``cancel_on_disconnect``: the actor in whose
    name the run is cancelled if the client hangs up before it ends (otherwise hanging up never stops a run).
    ``created``: the run as the request that created it holds it (``watching.watch_start``)."""
    org = context.org
    layer = get_channel_layer()
    channel = await layer.new_channel()
    group = events.run_group(run_id)
    # Subscribe before the snapshot: an event published in between is queued for us, not missed. The revocation
    # groups too: a signal sent meanwhile is then heard.
    groups = [group, revocation.org_group(org.pk)]
    if isinstance(principal, SessionPrincipal):
        groups.append(revocation.user_group(principal.user.pk))
    token = await subscribe(layer, groups, channel, principal=principal)
    receiver: asyncio.Future[Any] | None = None
    closing = asyncio.ensure_future(shutdown.streams_closing())
    ACTIVE_STREAMS.labels("sse").inc()
    ended = False
    recheck_s = float(settings.STREAM_REVALIDATE_SECONDS)
    loop = asyncio.get_running_loop()
    next_check = loop.time() + recheck_s
    try:
        # One hop: the credentials once more (a revocation committed before subscribing was not heard), the
        # snapshot, and start on attach.
        try:
            start = await awatch_start(
                principal=principal, context=context, run_id=run_id, token=token, created=created
            )
        except Exception:
            logger.warning("stream credentials could not be re-checked; ending the stream", exc_info=True)
            start = WatchStart(refused=CLOSE_UNAUTHENTICATED, run=None)  # fail closed
        if start.refused is not None:
            ended = True
            yield _revoked_frame(run_id)
            return
        run: Run | None = start.run
        if run is None:  # deleted in the instant since the gate looked
            ended = True
            return
        yield sse_frame(events.status_event(run))
        if run.is_terminal:
            ended = True
            yield sse_frame(events.finished_event(run, seq=0))
            return
        last_sent = loop.time()
        while True:
            if receiver is None:
                receiver = asyncio.ensure_future(layer.receive(channel))
            timeout = max(0.0, min(last_sent + keepalive_s, next_check) - loop.time())
            done, _ = await asyncio.wait({receiver, closing}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if closing in done:
                ended = True  # the stream goes, with a reason; the run does not (never cancelled for this)
                yield _restarting_frame(run_id)
                return
            if not done and loop.time() >= next_check:
                next_check = loop.time() + recheck_s
                if not await _still_allowed(principal, context):
                    ended = True  # the watcher goes; the run does not (never cancelled for this)
                    yield _revoked_frame(run_id)
                    return
                continue
            if not done:
                last_sent = loop.time()
                yield KEEPALIVE
                # Belt and braces: if the run ended but its run.finished never reached us (a channel layer
                # restart), end the stream anyway instead of keeping it open forever. The database being away
                # (a restart) is no reason to cut the stream: look again at the next keep-alive.
                try:
                    run = await database_sync_to_async(run_get_for_org)(org=org, run_id=run_id)
                except (OperationalError, InterfaceError):
                    logger.warning("run %s: stream kept open, the database cannot be read now", run_id)
                    continue
                if run is None or run.is_terminal:
                    ended = True
                    if run is not None:
                        yield sse_frame(events.finished_event(run, seq=0))
                    return
                continue
            message, receiver = receiver.result(), None
            if isinstance(message, dict) and message.get("type") == revocation.MESSAGE_TYPE:
                if not await _still_allowed(principal, context):
                    ended = True
                    yield _revoked_frame(run_id)
                    return
                continue
            if not isinstance(message, dict) or message.get("type") != "run.event":
                continue  # e.g. run.cancel, meant for the executor
            event = message.get("event")
            if not isinstance(event, dict) or "type" not in event or "seq" not in event:
                continue
            if event["type"] == "run.finished":
                ended = True
            last_sent = loop.time()
            yield sse_frame(event)
            if ended:
                return
    finally:
        ACTIVE_STREAMS.labels("sse").dec()
        closing.cancel()
        # Leave first: a message sent meanwhile (delivered in memory to this process's channels) would otherwise
        # land in a buffer nobody reads any more.
        for name in groups:
            with suppress(Exception):
                await layer.group_discard(name, channel)
        if receiver is not None:
            receiver.cancel()
        if not ended and cancel_on_disconnect is not None:
            await database_sync_to_async(_cancel_abandoned)(org=org, run_id=run_id, actor=cancel_on_disconnect)


def _cancel_abandoned(*, org: Organization, run_id: uuid.UUID, actor: Actor) -> None:
    run = run_get_for_org(org=org, run_id=run_id)
    if run is not None and not run.is_terminal:
        logger.info("run %s cancelled: its streaming client disconnected", run.id)
        run_request_cancel(run=run, actor=actor)


def event_stream_response(stream: AsyncIterator[bytes], *, status: int = 200) -> StreamingHttpResponse:
    """An SSE response around ``stream``: never cached, never buffered by a proxy."""
    response = StreamingHttpResponse(stream, content_type="text/event-stream; charset=utf-8", status=status)
    response["Cache-Control"] = "no-store"
    # nginx and similar proxies buffer responses by default; an event stream must flow as it is written.
    response["X-Accel-Buffering"] = "no"
    return response


class EventStreamRenderer(BaseRenderer):
    """Lets clients that send ``Accept: text/event-stream`` (EventSource, IDE plugins) through negotiation."""

    media_type = "text/event-stream"
    format = "sse"
    charset = "utf-8"

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        return json.dumps(data).encode()


class EventStreamNegotiationMixin:
    """For views that may answer with an event stream: clients sending ``Accept: text/event-stream`` pass
    negotiation, and errors before the stream starts are JSON in the API's shape whatever the client accepts (the
    stream itself is a StreamingHttpResponse and bypasses renderers)."""

    renderer_classes: Sequence[type[BaseRenderer]] = [JSONRenderer, EventStreamRenderer]

    def perform_content_negotiation(self, request: Request, force: bool = False) -> tuple[BaseRenderer, str]:
        return JSONRenderer(), JSONRenderer.media_type


def wants_event_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("Accept", "")


class RunEventsView(EventStreamNegotiationMixin, OrgAPIView):
    capabilities = {"GET": RUNS_READ}

    @extend_schema(
        operation_id="runs_events",
        summary="Stream a run's events (Server-Sent Events)",
        description="`text/event-stream`: the run's current `run.status` (seq 0), then live `text.delta`, "
        "`run.status`, `usage`, `error` and `run.finished` events (the websocket's JSON, one per `data:` line, "
        "with `event:` and `id:`), and a `: keep-alive` comment every 15 s. The stream ends after "
        "`run.finished`. Past text is never replayed: answers are not stored.",
        responses={
            (200, "text/event-stream"): OpenApiResponse(response=OpenApiTypes.STR, description="The event stream."),
            **error_responses(401, 403, 404),
        },
    )
    def get(self, request: Request, run_id: uuid.UUID) -> StreamingHttpResponse:
        # A run this process created for the caller's org a moment ago (an IDE opening the stream of the run it just
        # created) is known to be the org's: no read here, the stream's own hop reads what it needs.
        if not created_here(run_id, org_id=self.org.id) and run_get_for_org(org=self.org, run_id=run_id) is None:
            raise exceptions.NotFound("No such run.")
        return event_stream_response(
            run_event_stream(
                context=self.org_context,
                principal=self.principal,
                run_id=run_id,
                keepalive_s=float(settings.SSE_KEEPALIVE_SECONDS),
            )
        )
