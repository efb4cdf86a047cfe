"""The OpenAI-compatible proxy: ``POST /api/v1/chat/completions`` and ``GET /api/v1/models``.

Plain async Django views, not DRF: DRF is sync and would buffer the stream. They gate exactly like
``orgs.api.base.OrgAPIView`` with an org API key (``Authorization: Bearer`` as the stock SDKs send it, or
``x-api-key``): the org comes from the key, the key's scopes are its capabilities (``runs:write`` to complete,
``runs:read`` to list models). Dashboard sessions are not accepted: these views are CSRF-exempt, so a cookie must
never authenticate them. Errors use OpenAI's shape (``runs.proxy.errors``), not the rest of the API's, because
the clients here are OpenAI SDKs and IDEs.

One completion = one ``Run`` of kind ``completion`` (metadata only) and one usage-ledger row per provider attempt
that reported usage. The org's provider key is opened (audited) for the call only. Streaming responses are async
generators (Django streams them under ASGI): the first provider events are read *before* the 200 goes out, so a
provider that fails at once (bad key, rate limit, outage) gets a real HTTP status the SDK turns into the right
exception; a failure after that becomes one ``data: {"error": ...}`` frame. When the client hangs up, Django
cancels or closes the generator: the upstream connection is closed at once and the run ends ``cancelled`` with
the tokens known so far.

Nothing here logs a body, a prompt or an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import traceback
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_not_required
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db import connection
from django.db.models.functions import Lower
from django.http import HttpRequest, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from cesaflow.lib.http import get_http_client
from keys.checking import aprovider_key_models, models_cache_key
from keys.crypto import Secret
from keys.egress import egress_policy
from keys.models import KeyStatus, ProviderKey
from keys.selectors import provider_keys_for_org
from keys.services import (
    ProviderKeyDecryptionError,
    ProviderKeyUnavailable,
    provider_key_open,
    provider_key_record_check,
)
from orgs.authentication import AuthenticationError, api_key_verify, request_api_key
from orgs.models import ApiKey
from orgs.permissions import ORG_SUSPENDED, RUNS_READ, RUNS_WRITE, suspension_message
from orgs.tenancy import OrgContext, context_for_api_key
from runs import events as run_events
from runs.models import Run, RunKind, RunStatus
from runs.providers.base import CallLimits, StreamParser
from runs.providers.events import ErrorKind, Ping, ProviderError, ProviderEvent, Retry, TurnEnd, Usage
from runs.proxy import (
    DONE_FRAME,
    ERROR_SUMMARIES,
    MAX_BODY_BYTES,
    CompletionRequest,
    CompletionTranslator,
    ProxyAdapter,
    ProxyError,
    error_for_provider,
    parse_completion_request,
    parse_json_body,
    proxy_adapter_for,
    sse,
    stream_error_frame,
)
from runs.services import UsageEntry, run_create, run_finish

logger = logging.getLogger("cesaflow.proxy")

# Timeouts and the retry budget of one proxied call; read at call time, so a deployment or a test can tune it.
CALL_LIMITS = CallLimits()
# Cold-cache model listing checks keys concurrently, but never more than this many at once per request.
MODELS_CONCURRENCY = 8

ViewFunc = Callable[[HttpRequest], Coroutine[Any, Any, HttpResponseBase]]

# Cancellation clean-ups scheduled from a finalizer: referenced here until they end (asyncio keeps weak refs).
_background: set[asyncio.Task[None]] = set()


# --- Errors and authentication ------------------------------------------------------------------------------------


def _error_response(error: ProxyError) -> JsonResponse:
    response = JsonResponse(error.body(), status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    if error.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="cesaflow"'
    return response


def _log_failure(exc: BaseException, where: str) -> None:
    # The class and the innermost frame only: an exception's text could quote the request.
    frames = traceback.extract_tb(exc.__traceback__)
    at = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    logger.error("proxy failure in %s: %s at %s", where, type(exc).__name__, at)


def _openai_errors(view: ViewFunc) -> ViewFunc:
    """Every answer in OpenAI's error shape; an unexpected failure is a 500 in that shape, never a debug page."""

    @functools.wraps(view)
    async def wrapper(request: HttpRequest) -> HttpResponseBase:
        try:
            return await view(request)
        except ProxyError as exc:
            return _error_response(exc)
        except Exception as exc:
            _log_failure(exc, view.__name__)
            return _error_response(
                ProxyError(500, "The proxy failed unexpectedly.", type="server_error", code="internal_error")
            )

    return wrapper


def _method_not_allowed(allowed: str) -> ProxyError:
    return ProxyError(405, f"Use {allowed}.", code="method_not_allowed", headers={"Allow": allowed})


def _presented_key(request: HttpRequest) -> str:
    """The key as presented (no database): the one authentication path's rules, in OpenAI's error shape."""
    try:
        presented = request_api_key(request)
    except AuthenticationError as exc:
        raise ProxyError(401, exc.message, code=exc.code) from None
    if presented is None:
        raise ProxyError(
            401,
            "You didn't provide an API key. Send your CesaFlow org API key as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
        )
    return presented


async def _authenticate(request: HttpRequest, capability: str) -> OrgContext:
    """The DRF gate's rules (``orgs.authentication`` + ``OrgAPIView``) with OpenAI-shaped answers: 401 for a
    missing or bad key, 403 for a key whose scopes lack ``capability``. Dashboard sessions never count here."""
    presented = _presented_key(request)
    return await sync_to_async(_context_for_key)(presented, capability)


def _context_for_key(presented: str, capability: str) -> OrgContext:
    """``_authenticate``'s database part (sync)."""
    try:
        api_key = api_key_verify(presented)
    except AuthenticationError as exc:
        raise ProxyError(401, exc.message, code="invalid_api_key") from None
    context = context_for_api_key(api_key)
    if context.org.is_suspended:
        raise ProxyError(403, suspension_message(context.org), type="permission_error", code=ORG_SUSPENDED)
    if not context.can(capability):
        raise ProxyError(
            403,
            f"This API key's scopes do not include {capability!r}.",
            type="permission_error",
            code="insufficient_scope",
        )
    return context


# --- Reads and writes (sync, called through sync_to_async) --------------------------------------------------------


def _release_connection() -> None:
    """Hand this thread's database connection back to the pool at the end of a hop: a stream lives for seconds
    or minutes waiting on the provider and must not hold one of the pool's bounded connections meanwhile. Not
    inside a transaction (a test wrapping the request), and not without a pool (nothing to hand back)."""
    if connection.settings_dict.get("OPTIONS", {}).get("pool") and not connection.in_atomic_block:
        connection.close()


def _prepare_completion(request: HttpRequest, presented: str) -> tuple[OrgContext, CompletionRequest, ProviderKey, Run]:
    """Everything before the provider call in one thread hop (each hop costs a context switch under ASGI), in
    the order of the answers: authenticate (401/403), read and parse the body (413/400), find the key (404),
    create the run (429/400, committed)."""
    try:
        context = _context_for_key(presented, RUNS_WRITE)
        completion = parse_completion_request(parse_json_body(_read_body(request)))
        key = _key_for_label(context=context, label=completion.key_label)
        if key is None:
            raise _model_not_found(completion.requested_model)
        return context, completion, key, _start_run(context=context, key=key, completion=completion)
    finally:
        _release_connection()


def _key_for_label(*, context: OrgContext, label: str) -> ProviderKey | None:
    """The org's live key with this label (labels are unique per org, case-insensitively); another org's label
    finds nothing, exactly like a missing one."""
    return (
        provider_keys_for_org(org=context.org)
        .exclude(status=KeyStatus.REVOKED)
        .filter(label__iexact=label)
        .select_related("org")
        .first()
    )


def _listable_keys(*, context: OrgContext) -> list[ProviderKey]:
    # Invalid and restricted keys cannot list models; unchecked ones are checked on the way.
    keys = provider_keys_for_org(org=context.org).filter(status__in=[KeyStatus.VALID, KeyStatus.UNCHECKED])
    return list(keys.select_related("org").order_by(Lower("label"), "id"))


def _model_not_found(requested: str) -> ProxyError:
    return ProxyError(
        404,
        f"The model {requested[:200]!r} does not exist or you do not have access to it. "
        "GET /api/v1/models lists '<provider key label>/<model>' names.",
        param="model",
        code="model_not_found",
    )


def _start_run(*, context: OrgContext, key: ProviderKey, completion: CompletionRequest) -> Run:
    try:
        return run_create(
            org=context.org,
            actor=context.actor,
            provider_key_id=key.id,
            model=completion.model,
            kind=RunKind.COMPLETION,
            publish_status=False,  # published by the view without waiting (``_ProxyCall._publish``)
        )
    except ValidationError as exc:
        if getattr(exc, "code", None) == ORG_SUSPENDED:  # suspended since the key was checked
            raise ProxyError(403, exc.messages[0], type="permission_error", code=ORG_SUSPENDED) from None
        if getattr(exc, "code", None) == "token_cap_reached":
            raise ProxyError(
                429,
                exc.messages[0],
                type="insufficient_quota",
                code="token_cap_reached",
                headers={"x-should-retry": "false"},  # waiting a few seconds will not lift a monthly cap
            ) from None
        fields = exc.message_dict if hasattr(exc, "error_dict") else {}
        if "provider_key" in fields:
            raise _model_not_found(completion.requested_model) from None
        raise ProxyError(400, " ".join(exc.messages), param="model" if "model" in fields else None) from None


def _finish_run(*, run_id: Any, status: str, usage: list[UsageEntry], error_kind: str, error_message: str) -> Run:
    try:
        return run_finish(run_id=run_id, status=status, usage=usage, error_kind=error_kind, error_message=error_message)
    finally:
        _release_connection()


def _mark_key_invalid(*, key: ProviderKey, actor: ApiKey) -> None:
    """A provider 401 during a completion is a key check with a clear answer: record it (once)."""
    if key.status == KeyStatus.INVALID:
        return
    try:
        provider_key_record_check(
            key=key, actor=actor, status=KeyStatus.INVALID, detail="The provider answered 401 to a completion."
        )
    except ProviderKeyUnavailable:
        return  # revoked meanwhile: nothing left to mark
    finally:
        _release_connection()
    cache.delete(models_cache_key(org_id=key.org_id, key_id=key.id))


# --- One proxied call ---------------------------------------------------------------------------------------------


class _ProxyCall:
    """One completion: the open key, the provider stream, the run's bookkeeping. ``finish`` runs exactly once,
    whatever ends the call (the turn's end, a provider error, the client hanging up)."""

    def __init__(self, *, context: OrgContext, completion: CompletionRequest, key: ProviderKey, run: Run) -> None:
        self.context = context
        self.completion = completion
        self.key = key
        self.run = run
        self.translator = CompletionTranslator(
            completion_id=f"chatcmpl-{run.id.hex}", created=int(time.time()), model=completion.requested_model
        )
        self.usage: list[UsageEntry] = []
        self.finished = False
        self._stack = AsyncExitStack()
        self._adapter: ProxyAdapter | None = None
        self._events: AsyncGenerator[ProviderEvent, None] | None = None
        self._parser_with_usage: StreamParser | None = None
        self._terminal_seen = False  # the adapter said its last word (TurnEnd or ProviderError)
        # The run's first status event goes out concurrently with the provider call; the finished event waits
        # for it, so live views see them in order.
        self._status_published = asyncio.ensure_future(self._publish(run_events.status_event(run)))

    def __repr__(self) -> str:
        return f"<_ProxyCall run={self.run.id} finished={self.finished}>"

    async def begin(self) -> list[ProviderEvent]:
        """Open the key, start the provider call and read up to its first decisive event: content, the end of the
        turn or an error (retries, pings and usage are consumed on the way). That event decides the status code."""
        secret = await sync_to_async(self._open_key)()
        self._adapter = proxy_adapter_for(
            self.key.provider,
            base_url=self.key.base_url or None,
            api_key=secret.reveal(),
            client=get_http_client(egress_policy()),
            options=self.completion.options,
            limits=CALL_LIMITS,
        )
        self._events = self._adapter.stream_chat(self.completion.chat)
        while True:
            event = await self.next_event()
            if not isinstance(event, Usage | Ping | Retry):
                return [event]

    def _open_key(self) -> Secret:
        """``provider_key_open`` (audited ``key.used``, committed before the call), entered in the hop's thread;
        the secret is dropped when the call's exit stack closes."""
        opened = contextlib.ExitStack()
        try:
            secret = opened.enter_context(
                provider_key_open(
                    key=self.key, actor=self.context.actor, purpose="completion", reference=str(self.run.id)
                )
            )
        finally:
            _release_connection()
        self._stack.callback(opened.close)
        return secret

    async def _publish(self, event: run_events.RunEvent) -> None:
        try:
            await run_events.apublish(self.run, event)
        except Exception as exc:  # live views miss one update; the run row is already right
            _log_failure(exc, "publish")

    async def next_event(self) -> ProviderEvent:
        if self._events is None:
            raise RuntimeError("the provider call has not started")
        try:
            event = await anext(self._events)
        except StopAsyncIteration:
            # The adapters always end with TurnEnd or ProviderError; treat a silent end as what it would be.
            event = ProviderError(kind=ErrorKind.INCOMPLETE, retryable=False, message="The provider call ended early.")
        if isinstance(event, Usage):
            self._take_usage(event)
        elif isinstance(event, TurnEnd | ProviderError):
            self._terminal_seen = True
        return event

    def _take_usage(self, usage: Usage) -> None:
        """Usage is taken here, as it arrives (the callers skip Usage events): for the client's totals and for the
        ledger, one entry per attempt that reported any count."""
        self.translator.usage.add(usage)
        if self._adapter is not None:
            self._parser_with_usage = self._adapter.current_parser
        if usage.input_tokens is not None or usage.output_tokens is not None:
            self.usage.append(
                UsageEntry(
                    provider=self.key.provider,
                    model=self.completion.model,
                    input_tokens=usage.input_tokens or 0,
                    output_tokens=usage.output_tokens or 0,
                    complete=usage.complete,
                )
            )

    async def _close_upstream(self) -> None:
        events, self._events = self._events, None
        try:
            if events is not None and self._terminal_seen:
                # After its terminal event the adapter reads the body's last bytes (bounded), so the connection
                # goes back to the pool for the next call.
                async for _ in events:
                    pass
            elif events is not None:
                # Mid-call (the client left, or we failed): drop the connection, not drained, so the provider
                # stops generating and billing at once.
                await events.aclose()
        finally:
            await self._stack.aclose()  # the secret is dropped here
        parser = self._adapter.current_parser if self._adapter is not None else None
        if not self._terminal_seen and parser is not None and parser is not self._parser_with_usage:
            # The attempt in flight never reported usage; keep what it knew (Anthropic: the input tokens).
            partial = parser.partial_usage()
            if partial is not None:
                self._take_usage(partial)
        self._adapter = None

    async def finish(
        self, status: str, *, error: ProviderError | None = None, error_kind: str = "", error_message: str = ""
    ) -> None:
        """Close the upstream, drop the key, then record the run's end (shielded: a second cancellation while
        writing must not lose the usage the provider bills for)."""
        if self.finished:
            return
        self.finished = True
        try:
            await self._close_upstream()
        finally:
            if error is not None:
                error_kind, error_message = error.kind.value, ERROR_SUMMARIES.get(error.kind, "")
            elif status == RunStatus.CANCELLED and not error_kind:
                error_kind, error_message = "cancelled", "The client disconnected."
            write = asyncio.ensure_future(self._record(status, error_kind, error_message))
            await asyncio.shield(write)

    async def _record(self, status: str, error_kind: str, error_message: str) -> None:
        run = await sync_to_async(_finish_run)(
            run_id=self.run.id, status=status, usage=self.usage, error_kind=error_kind, error_message=error_message
        )
        self.run = run
        await self._status_published  # never raises: ``_publish`` logs failures
        await self._publish(run_events.finished_event(run, seq=1))

    def finish_when_dropped(self, stream: AsyncIterator[bytes]) -> None:
        """If the response is dropped before its body is ever iterated (the client left right after the view
        returned), the generator's own ``finally`` never runs; this finalizer ends the call instead."""
        loop = asyncio.get_running_loop()

        def schedule() -> None:
            if not self.finished:
                task = loop.create_task(self.finish(RunStatus.CANCELLED))
                _background.add(task)
                task.add_done_callback(_background.discard)

        weakref.finalize(stream, lambda: loop.call_soon_threadsafe(schedule) if not loop.is_closed() else None)

    async def stream(self, head: list[ProviderEvent]) -> AsyncIterator[bytes]:
        """The SSE body: role chunk, deltas, finish chunk, usage chunk (if asked for), ``[DONE]``. The run is
        recorded before the last frames go out, so a client that has read ``[DONE]`` finds it finished."""
        try:
            yield sse(self.translator.role_chunk())
            pending = list(head)
            while True:
                event = pending.pop(0) if pending else await self.next_event()
                if isinstance(event, ProviderError):
                    await self.finish(RunStatus.FAILED, error=event)
                    yield stream_error_frame(event, key_label=self.key.label)
                    return
                if isinstance(event, Usage):
                    continue
                frames = self.translator.feed(event)
                if frames:
                    yield b"".join(sse(frame) for frame in frames)
                if isinstance(event, TurnEnd):
                    break
            await self.finish(RunStatus.SUCCEEDED)
            if self.completion.include_usage:
                yield sse(self.translator.usage_chunk())
            yield DONE_FRAME
        finally:
            # Reached with the run still open only when the client went away (Django cancels or closes us).
            await self.finish(RunStatus.CANCELLED)

    async def collect(self, head: list[ProviderEvent]) -> JsonResponse:
        """The non-streaming answer: the whole turn as one ``chat.completion``."""
        status: str = RunStatus.CANCELLED
        error: ProviderError | None = None
        try:
            pending = list(head)
            while True:
                event = pending.pop(0) if pending else await self.next_event()
                if isinstance(event, ProviderError):
                    status, error = RunStatus.FAILED, event
                    break
                if not isinstance(event, Usage):
                    self.translator.feed(event)
                if isinstance(event, TurnEnd):
                    status = RunStatus.SUCCEEDED
                    break
        finally:
            await self.finish(status, error=error)
        if error is not None:
            raise error_for_provider(error, key_label=self.key.label)
        response = JsonResponse(self.translator.completion())
        response["x-cesaflow-run-id"] = str(self.run.id)
        return response


async def _begin(call: _ProxyCall) -> list[ProviderEvent]:
    """``call.begin()``, ending the run whatever goes wrong before the first decisive event."""
    try:
        return await call.begin()
    except asyncio.CancelledError:
        await call.finish(RunStatus.CANCELLED)
        raise
    except ProviderKeyUnavailable:
        await call.finish(RunStatus.FAILED, error_kind="key_unavailable", error_message="The key was revoked.")
        raise _model_not_found(call.completion.requested_model) from None
    except ProviderKeyDecryptionError:
        await call.finish(RunStatus.FAILED, error_kind="key_unreadable", error_message="The key cannot be opened.")
        raise ProxyError(
            500,
            f"The stored key {call.key.label!r} could not be decrypted. "
            "An admin of the organization must add it again.",
            type="server_error",
            code="provider_key_unreadable",
            headers={"x-should-retry": "false"},
        ) from None
    except BaseException:
        await call.finish(RunStatus.FAILED, error_kind="internal", error_message="The proxy failed unexpectedly.")
        raise


async def _start(request: HttpRequest, presented: str) -> tuple[OrgContext, CompletionRequest, ProviderKey, Run]:
    """``_prepare_completion``. If the client leaves meanwhile, the run is still written (the thread cannot be
    stopped): end it as cancelled rather than leave it running forever."""
    creating = asyncio.ensure_future(sync_to_async(_prepare_completion)(request, presented))
    try:
        return await asyncio.shield(creating)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            *_, run = await creating
            await sync_to_async(_finish_run)(
                run_id=run.id,
                status=RunStatus.CANCELLED,
                usage=[],
                error_kind="cancelled",
                error_message="The client disconnected.",
            )
        raise


def _read_body(request: HttpRequest) -> bytes:
    declared = request.META.get("CONTENT_LENGTH") or ""
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ProxyError(413, "The request body is too large.", code="request_too_large")
    if hasattr(request, "_body"):
        return request.body
    # request.body would apply DATA_UPLOAD_MAX_MEMORY_SIZE (1 MiB, sized for forms); the proxy has its own cap.
    return request.read(MAX_BODY_BYTES + 1)


# --- Views --------------------------------------------------------------------------------------------------------


@csrf_exempt
@login_not_required
@_openai_errors
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    """``POST /api/v1/chat/completions``: OpenAI Chat Completions, streaming or not, with an org's stored key."""
    if request.method != "POST":
        raise _method_not_allowed("POST")
    context, completion, key, run = await _start(request, _presented_key(request))
    call = _ProxyCall(context=context, completion=completion, key=key, run=run)
    head = await _begin(call)
    first = head[0]
    if isinstance(first, ProviderError):
        await call.finish(RunStatus.FAILED, error=first)
        if first.kind is ErrorKind.AUTH and isinstance(context.actor, ApiKey):
            await sync_to_async(_mark_key_invalid)(key=key, actor=context.actor)
        raise error_for_provider(first, key_label=key.label)
    if not completion.stream:
        return await call.collect(head)
    body = call.stream(head)
    call.finish_when_dropped(body)
    response = StreamingHttpResponse(body, content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass every frame on at once
    response["x-cesaflow-run-id"] = str(run.id)
    return response


async def _models_of(key: ProviderKey, actor: ApiKey | Any, limit: asyncio.Semaphore) -> tuple[str, ...]:
    async with limit:
        try:
            return await aprovider_key_models(key=key, actor=actor)
        except (ProviderKeyUnavailable, ProviderKeyDecryptionError):
            return ()  # revoked meanwhile, or unreadable (audited): nothing to offer


@csrf_exempt
@login_not_required
@_openai_errors
async def list_models(request: HttpRequest) -> HttpResponseBase:
    """``GET /api/v1/models``: ``<label>/<model>`` for every model of the org's usable keys (cached briefly)."""
    if request.method not in ("GET", "HEAD"):
        raise _method_not_allowed("GET")
    context = await _authenticate(request, RUNS_READ)
    keys = await sync_to_async(_listable_keys)(context=context)
    limit = asyncio.Semaphore(MODELS_CONCURRENCY)
    lists = await asyncio.gather(*(_models_of(key, context.actor, limit) for key in keys))
    data = [
        {"id": f"{key.label}/{model}", "object": "model", "created": 0, "owned_by": key.provider}
        for key, models in zip(keys, lists, strict=True)
        for model in models
    ]
    return JsonResponse({"object": "list", "data": data})
