"""The OpenAI-compatible proxy: ``POST /api/v1/chat/completions`` and ``GET /api/v1/models``.

Plain async Django views, not DRF: DRF is sync and would buffer the stream. They gate exactly like
``orgs.api.base.OrgAPIView`` with an org API key (``Authorization: Bearer`` as the stock SDKs send it, or
``x-api-key``): the org comes from the key, the key's scopes are its capabilities (``runs:write`` to complete,
``runs:read`` to list models). Dashboard sessions are not accepted: these views are CSRF-exempt, so a cookie must
never authenticate them. Errors use OpenAI's shape (``runs.proxy.errors``), not the rest of the API's, because
the clients here are OpenAI SDKs and IDEs.

One completion = one ``Run`` of kind ``completion`` (metadata only) and one usage-ledger row per provider attempt
that reported usage. The org's provider key is opened (audited ``key.used``) for the call only. The hot path runs
on the event loop (issue #13): the API key and the provider key row come from generation-checked in-process caches
(``orgs.api_key_cache``, ``runs.api.proxy_keys``), the sealed value is opened in memory, and the provider call starts
while one thread hop writes the run row and the audit row (for an org with a monthly token cap the hop comes
first, so a reached cap never costs a provider call). Streaming responses are async generators (Django streams them
under ASGI): the first provider events are awaited *before* the 200 goes out, so a provider that fails at once (bad
key, rate limit, outage) gets a real HTTP status the SDK turns into the right exception; the run's row is not (the
first words go out as soon as the provider sends them), but ``[DONE]`` and a non-streaming answer wait for it
(``runs.api.proxy_call``). A failure after the 200 becomes one ``data: {"error": ...}`` frame. When the client
hangs up, Django cancels or closes the generator: the upstream connection is closed at once and the run ends
``cancelled`` with the tokens known so far. The run's end is written off the response path (``runs.api.proxy_call``).

Nothing here logs a body, a prompt or an answer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from django.contrib.auth.decorators import login_not_required
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db import InterfaceError, OperationalError
from django.db.models.functions import Lower
from django.http import HttpRequest, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from cesaflow.lib.body_limit import too_large_message
from cesaflow.lib.hops import db_hop
from cesaflow.lib.ratelimit import Exceeded
from cesaflow.lib.row_cache import ageneration
from keys.checking import CachedCheck, acached_checks, aprovider_key_check, models_cache_key
from keys.crypto import Secret
from keys.models import KeyStatus, ProviderKey
from keys.providers import ProbeStatus
from keys.selectors import provider_keys_for_org
from keys.services import (
    ProviderKeyDecryptionError,
    ProviderKeyUnavailable,
    provider_key_record_check,
    provider_key_record_decrypt_failure,
    provider_key_unseal,
)
from orgs import rate_limits
from orgs.authentication import AuthenticationError, aapi_key_verify, api_key_held, request_api_key
from orgs.models import ApiKey
from orgs.permissions import KEYS_WRITE, ORG_SUSPENDED, RUNS_READ, RUNS_WRITE, suspension_message
from orgs.tenancy import OrgContext, context_for_api_key
from runs.api.proxy_call import ProxyCall, ended_on_failure, log_failure
from runs.api.proxy_keys import akey_for_label
from runs.models import Run, RunKind, RunStatus
from runs.providers.events import ErrorKind, ProviderError, ProviderEvent
from runs.proxy import (
    ProxyError,
    database_unavailable,
    error_for_provider,
    max_body_bytes,
    parse_completion_request,
    parse_json_body,
)
from runs.services import run_create, run_finish, tokens_estimate

logger = logging.getLogger("cesaflow.proxy")

# A keys:write caller's listing checks the keys with nothing cached concurrently, never more than this many at once.
MODELS_CONCURRENCY = 8

ViewFunc = Callable[[HttpRequest], Coroutine[Any, Any, HttpResponseBase]]


# --- Errors and authentication ------------------------------------------------------------------------------------


def _error_response(error: ProxyError) -> JsonResponse:
    response = JsonResponse(error.body(), status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    if error.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="cesaflow"'
    return response


def _openai_errors(view: ViewFunc) -> ViewFunc:
    """Every answer in OpenAI's error shape; an unexpected failure is a 500 in that shape, never a debug page."""

    @functools.wraps(view)
    async def wrapper(request: HttpRequest) -> HttpResponseBase:
        try:
            return await view(request)
        except ProxyError as exc:
            return _error_response(exc)
        except (OperationalError, InterfaceError) as exc:
            logger.warning("gateway %s: the database cannot be reached (%s)", view.__name__, type(exc).__name__)
            return _error_response(database_unavailable())
        except Exception as exc:
            log_failure(exc, view.__name__)
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


def _rate_limited(exceeded: Exceeded) -> ProxyError:
    """OpenAI's own 429 shape: the SDKs raise ``RateLimitError`` and, when they retry, wait ``retry-after``."""
    return ProxyError(
        429,
        rate_limits.message(exceeded),
        type="requests",
        code="rate_limit_exceeded",
        headers={
            "Retry-After": str(exceeded.retry_after),
            "x-ratelimit-limit-requests": str(exceeded.rate.requests),
            "x-ratelimit-reset-requests": f"{exceeded.retry_after}s",
        },
    )


async def _authenticate(request: HttpRequest, capability: str) -> tuple[OrgContext, str | None]:
    """The DRF gate's rules (``orgs.authentication`` + ``OrgAPIView``) with OpenAI-shaped answers: 401 for a
    missing or bad key, 429 past a rate limit (``orgs.rate_limits``), 403 for a suspended org or a key whose scopes
    lack ``capability``. Dashboard sessions never count here. Also returns the authorization generation it read
    (``row_cache``), for the caller's own cached lookups.

    A key this process verified recently costs one Redis round trip and no thread hop: its rate limits counted and
    the generation read together, the key trusted only if it was verified under that generation
    (``api_key_held``); otherwise (a revocation, any change to keys, orgs or users, a generation that could not be
    read) it is verified again, under the generation read, before anything else happens. A key that verifies counts
    once in its own and its org's limits, as on the other path; one that no longer does has cost them this call
    (once per process: it is then forgotten) and is answered as any bad key."""
    try:
        presented = _presented_key(request)
        held = api_key_held(presented)
        if held is not None:
            context = context_for_api_key(held[1])
            exceeded, token = await rate_limits.agateway_call(request, context, generation=True)
            if token is None or token != held[0]:
                context = context_for_api_key(await aapi_key_verify(presented, token=token))
        else:
            token = await ageneration()
            context = context_for_api_key(await aapi_key_verify(presented, token=token))
            exceeded, _ = await rate_limits.agateway_call(request, context, generation=False)
    except (ProxyError, AuthenticationError) as exc:
        # Missing and bad keys count per client IP (one async Redis round trip); past the limit, 429 for the 401.
        flood = await rate_limits.aapi_unauthenticated(request)
        if flood is not None:
            raise _rate_limited(flood) from None
        raise exc if isinstance(exc, ProxyError) else ProxyError(401, exc.message, code="invalid_api_key") from None
    if exceeded is not None:
        raise _rate_limited(exceeded)
    if context.org.is_suspended:
        raise ProxyError(403, suspension_message(context.org), type="permission_error", code=ORG_SUSPENDED)
    if not context.can(capability):
        raise ProxyError(
            403,
            f"This API key's scopes do not include {capability!r}.",
            type="permission_error",
            code="insufficient_scope",
        )
    return context, token


def _model_not_found(requested: str) -> ProxyError:
    return ProxyError(
        404,
        f"The model {requested[:200]!r} does not exist or you do not have access to it. "
        "GET /api/v1/models lists '<provider key label>/<model>' names.",
        param="model",
        code="model_not_found",
    )


def _read_body(request: HttpRequest) -> bytes:
    # The server (cesaflow.serve) and the ASGI middleware refuse a larger body before it arrives; this covers the
    # test client and any other way in. A chunked body read past the limit is refused by parse_json_body.
    limit = max_body_bytes()
    declared = request.META.get("CONTENT_LENGTH") or ""
    if declared.isdigit() and int(declared) > limit:
        raise ProxyError(413, too_large_message(limit), code="request_too_large")
    if hasattr(request, "_body"):
        return request.body
    # request.body would apply DATA_UPLOAD_MAX_MEMORY_SIZE (1 MiB, sized for forms); the proxy has its own cap.
    return request.read(limit + 1)


# --- The run's bookkeeping (sync, one thread hop each) ----------------------------------------------------------


def _start_run(*, call: ProxyCall, key_use: str | None) -> Run:
    """The run row (with ``key_use``: and the ``key.used`` audit row, in one transaction; the provider call may
    already be on its way). Refusals become OpenAI-shaped errors."""
    try:
        return run_create(
            run_id=call.run_id,
            org=call.context.org,
            actor=call.context.actor,
            held_key=call.key,
            model=call.completion.model,
            kind=RunKind.COMPLETION,
            publish_status=False,  # published from the event loop once committed (``ProxyCall.record_start``)
            # What the call can cost, reserved against a monthly token cap: the body's size and its max_tokens.
            token_estimate=tokens_estimate(
                prompt_bytes=call.prompt_bytes, max_output_tokens=call.completion.chat.max_tokens
            ),
            key_use=key_use,
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
            raise _model_not_found(call.completion.requested_model) from None
        raise ProxyError(400, " ".join(exc.messages), param="model" if "model" in fields else None) from None


def _record_start(call: ProxyCall) -> Run:
    """The run row and the ``key.used`` audit row, committed together (while the provider call starts, or just
    before it for an org with a monthly token cap)."""
    return _start_run(call=call, key_use="completion")


def _record_unreadable(call: ProxyCall) -> None:
    """A stored value that does not open: audited ``key.decrypt_failed``, and the run recorded as failed."""
    provider_key_record_decrypt_failure(key=call.key, actor=call.context.actor, purpose="completion")
    run = _start_run(call=call, key_use=None)
    run_finish(
        run_id=run.id,
        status=RunStatus.FAILED,
        usage=[],
        error_kind="key_unreadable",
        error_message="The key cannot be opened.",
    )


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
    cache.delete(models_cache_key(org_id=key.org_id, key_id=key.id))


# --- Starting a call ----------------------------------------------------------------------------------------------


async def _unseal(call: ProxyCall) -> Secret:
    """The key's plaintext, opened in memory from the row the call holds."""
    try:
        return provider_key_unseal(key=call.key)
    except ProviderKeyUnavailable:
        raise _model_not_found(call.completion.requested_model) from None
    except ProviderKeyDecryptionError:
        await db_hop(_record_unreadable)(call)
        raise ProxyError(
            500,
            f"The stored key {call.key.label!r} could not be decrypted. "
            "An admin of the organization must add it again.",
            type="server_error",
            code="provider_key_unreadable",
            headers={"x-should-retry": "false"},
        ) from None


async def _start(call: ProxyCall, secret: Secret) -> list[ProviderEvent]:
    """Start writing the run (``_record_start``) and the provider call, concurrently unless the org has a monthly
    token cap (a reached cap must never cost a provider call: the run, which reserves against it, comes first);
    return the call's first decisive events. The first byte does not wait for the run's row, the last one does
    (``ProxyCall.recorded``); a refusal already known here is a real HTTP status."""
    call.hold(secret)
    async with ended_on_failure(call):
        call.record_start(db_hop(_record_start)(call))
        if call.context.org.monthly_token_cap is not None:
            await call.recorded()
        head = await call.begin()
        refused = call.refusal()
        if refused is not None:
            raise refused
        return head


# --- Views --------------------------------------------------------------------------------------------------------


@csrf_exempt
@login_not_required
@_openai_errors
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    """``POST /api/v1/chat/completions``: OpenAI Chat Completions, streaming or not, with an org's stored key."""
    if request.method != "POST":
        raise _method_not_allowed("POST")
    context, token = await _authenticate(request, RUNS_WRITE)  # the generation read once, for both cached lookups
    raw = _read_body(request)
    completion = parse_completion_request(parse_json_body(raw))
    key = await akey_for_label(context=context, label=completion.key_label, token=token)
    if key is None:
        raise _model_not_found(completion.requested_model)
    call = ProxyCall(context=context, completion=completion, key=key, prompt_bytes=len(raw))
    head = await _start(call, await _unseal(call))
    first = head[0]
    if isinstance(first, ProviderError):
        await call.finish(RunStatus.FAILED, error=first)
        if first.kind is ErrorKind.AUTH and isinstance(context.actor, ApiKey):
            await db_hop(_mark_key_invalid)(key=key, actor=context.actor)
        raise error_for_provider(first, key_label=key.label)
    if not completion.stream:
        return await call.collect(head)
    body = call.stream(head)
    call.finish_when_dropped(body)
    response = StreamingHttpResponse(body, content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass every frame on at once
    response["x-cesaflow-run-id"] = str(call.run_id)
    return response


def _listable_keys(*, context: OrgContext) -> list[ProviderKey]:
    # Invalid and restricted keys cannot list models; an unchecked one may have been checked a moment ago.
    keys = provider_keys_for_org(org=context.org).filter(status__in=[KeyStatus.VALID, KeyStatus.UNCHECKED])
    return list(keys.select_related("org").order_by(Lower("label"), "id"))


async def _models_of(
    key: ProviderKey, cached: CachedCheck | None, context: OrgContext, limit: asyncio.Semaphore
) -> tuple[str, ...]:
    """The key's models as its cached check knows them. Nothing cached: a live check only for a caller with
    ``keys:write`` (an outbound call and audit rows, issue #14 point 5); anyone else gets none ("not checked yet")."""
    if cached is not None:
        return cached.models
    if not context.can(KEYS_WRITE):
        return ()
    async with limit:
        try:
            result = await aprovider_key_check(key=key, actor=context.actor)
        except (ProviderKeyUnavailable, ProviderKeyDecryptionError):
            return ()  # revoked meanwhile, or unreadable (audited): nothing to offer
    return result.models if result.status is ProbeStatus.VALID else ()


@csrf_exempt
@login_not_required
@_openai_errors
async def list_models(request: HttpRequest) -> HttpResponseBase:
    """``GET /api/v1/models``: ``<label>/<model>`` for every model of the org's usable keys, from their cached
    checks (``keys.checking``): a key not checked yet is absent, unless the caller may check it (``keys:write``)."""
    if request.method not in ("GET", "HEAD"):
        raise _method_not_allowed("GET")
    context, _ = await _authenticate(request, RUNS_READ)
    keys = await db_hop(_listable_keys)(context=context)
    cached = await acached_checks(org_id=context.org.id, key_ids=[key.id for key in keys])
    limit = asyncio.Semaphore(MODELS_CONCURRENCY)
    lists = await asyncio.gather(*(_models_of(key, cached.get(key.id), context, limit) for key in keys))
    data = [
        {"id": f"{key.label}/{model}", "object": "model", "created": 0, "owned_by": key.provider}
        for key, models in zip(keys, lists, strict=True)
        for model in models
    ]
    return JsonResponse({"object": "list", "data": data})
