"""Classify provider failures (HTTP statuses, in-stream error payloads, transport errors) into ``ProviderError``
(providers.md §1.6). Retry rules follow the official SDKs: 408, 409, 429 and 5xx (529 too) are retryable, the
``x-should-retry`` header overrides the status, and quota / spend-limit 429s are not retried (waiting won't help).
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import httpx

from cesaflow.lib.http import EgressDenied
from cesaflow.lib.redact import redact
from keys.urlguard import NOT_ALLOWED_MESSAGE
from runs.providers.events import ErrorKind, ProviderError
from runs.providers.sse import SSEProtocolError

logger = logging.getLogger("cesaflow.providers")

MAX_MESSAGE_CHARS = 500

RETRYABLE_KINDS = frozenset(
    {ErrorKind.RATE_LIMIT, ErrorKind.OVERLOADED, ErrorKind.SERVER, ErrorKind.TIMEOUT, ErrorKind.NETWORK}
    | {ErrorKind.INCOMPLETE}
)

# Codes/types that mean "waiting won't help": out of credit or over a spend limit.
_QUOTA_CODES = frozenset(
    {"insufficient_quota", "billing_hard_limit_reached", "enforced_spend_limit_reached", "billing_error"}
)

# error.type / error.code values across OpenAI, Anthropic and Groq -> kind.
_TYPE_KINDS: dict[str, ErrorKind] = {
    "authentication_error": ErrorKind.AUTH,
    "invalid_api_key": ErrorKind.AUTH,
    "permission_error": ErrorKind.PERMISSION,
    "billing_error": ErrorKind.BILLING_QUOTA,
    "insufficient_quota": ErrorKind.BILLING_QUOTA,
    "rate_limit_error": ErrorKind.RATE_LIMIT,
    "rate_limit_exceeded": ErrorKind.RATE_LIMIT,
    "overloaded_error": ErrorKind.OVERLOADED,
    "capacity_exceeded": ErrorKind.OVERLOADED,
    "api_error": ErrorKind.SERVER,
    "server_error": ErrorKind.SERVER,
    "internal_server_error": ErrorKind.SERVER,
    "timeout_error": ErrorKind.SERVER,
    "service_unavailable": ErrorKind.SERVER,
    "not_found_error": ErrorKind.NOT_FOUND,
    "model_not_found": ErrorKind.NOT_FOUND,
    "request_too_large": ErrorKind.TOO_LARGE,
    "context_length_exceeded": ErrorKind.TOO_LARGE,
    "tool_use_failed": ErrorKind.MODEL_TOOL_ERROR,
    "invalid_request_error": ErrorKind.BAD_REQUEST,
}

_STATUS_KINDS: dict[int, ErrorKind] = {
    401: ErrorKind.AUTH,
    402: ErrorKind.BILLING_QUOTA,
    403: ErrorKind.PERMISSION,
    404: ErrorKind.NOT_FOUND,
    408: ErrorKind.TIMEOUT,
    409: ErrorKind.SERVER,
    413: ErrorKind.TOO_LARGE,
    429: ErrorKind.RATE_LIMIT,
    498: ErrorKind.OVERLOADED,  # Groq flex tier capacity exceeded
    529: ErrorKind.OVERLOADED,  # Anthropic API-wide overload
}


def scrub(message: str, secret: str | None = None) -> str:
    """Provider text made safe to show and log: the caller's key removed (providers echo keys in 401 bodies),
    credential-shaped strings redacted, length capped."""
    if secret and len(secret) >= 4:
        message = message.replace(secret, "[redacted]")
    message = redact(message)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    return message


def parse_retry_after(headers: Mapping[str, str] | httpx.Headers, *, now: float | None = None) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` (milliseconds) or ``retry-after`` (seconds, floats allowed, or an
    HTTP date), as the SDKs read them. None when absent, unparsable or not positive. No cap here: the retry
    policy decides what is too long to wait."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
        except ValueError:
            value = 0.0
        if 0 < value < float("inf"):
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        parsed = email.utils.parsedate_tz(raw)
        if parsed is None:
            return None
        value = email.utils.mktime_tz(parsed) - (time.time() if now is None else now)
    return value if 0 < value < float("inf") else None


def _should_retry_header(headers: Mapping[str, str] | httpx.Headers) -> bool | None:
    value = (headers.get("x-should-retry") or "").strip().lower()
    return {"true": True, "false": False}.get(value)


def _request_id(headers: Mapping[str, str] | httpx.Headers, body: Mapping[str, Any] | None) -> str | None:
    rid = headers.get("x-request-id") or headers.get("request-id")
    if not rid and body is not None and isinstance(body.get("request_id"), str):
        rid = body["request_id"]
    return rid[:200] if rid else None


def _error_object(body: Any) -> Mapping[str, Any]:
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping):
            return error
        if isinstance(error, str):  # some gateways send {"error": "text"}
            return {"message": error}
    return {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _codes(error: Mapping[str, Any]) -> list[str]:
    """The error's type, code and Anthropic's details.error_code, lower-cased, most specific first."""
    found: list[str] = []
    details = error.get("details")
    if isinstance(details, Mapping) and isinstance(details.get("error_code"), str):
        found.append(details["error_code"].lower())
    for key in ("code", "type"):
        if isinstance(error.get(key), str):
            found.append(error[key].lower())
    return found


def _is_scope_message(message: str) -> bool:
    lowered = message.lower()
    return "missing scopes" in lowered or "insufficient permissions" in lowered


def _kind_from(status: int | None, codes: list[str], message: str) -> ErrorKind:
    if any(code in _QUOTA_CODES for code in codes):
        return ErrorKind.BILLING_QUOTA
    if "tool_use_failed" in codes:
        return ErrorKind.MODEL_TOOL_ERROR
    if status in (401, 403) and _is_scope_message(message):
        return ErrorKind.PERMISSION  # a valid, restricted key: not "invalid key"
    if status is not None and status in _STATUS_KINDS:
        return _STATUS_KINDS[status]
    for code in codes:
        if code in _TYPE_KINDS:
            return _TYPE_KINDS[code]
    if status is None:
        return ErrorKind.SERVER
    return ErrorKind.SERVER if status >= 500 else ErrorKind.BAD_REQUEST


def classify_http_error(
    status: int, headers: Mapping[str, str] | httpx.Headers, body: bytes, *, secret: str | None = None
) -> ProviderError:
    """A non-2xx response. ``body`` is the (size-capped) response body; it is parsed, never logged."""
    try:
        parsed: Any = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        parsed = None
    error = _error_object(parsed)
    message = _text(error.get("message"))
    codes = _codes(error)
    kind = _kind_from(status, codes, message)
    if kind is ErrorKind.SERVER and "overloaded_error" in codes:
        kind = ErrorKind.OVERLOADED
    if status == 400 and "context_length_exceeded" in codes:
        kind = ErrorKind.TOO_LARGE
    retryable = kind in RETRYABLE_KINDS
    override = _should_retry_header(headers)
    if override is not None:
        retryable = override
    return ProviderError(
        kind=kind,
        retryable=retryable,
        message=scrub(message or f"The provider answered HTTP {status}.", secret),
        retry_after_s=parse_retry_after(headers),
        request_id=_request_id(headers, parsed if isinstance(parsed, Mapping) else None),
        status=status,
        code=codes[0] if codes else None,
    )


def classify_stream_error(payload: Any, *, request_id: str | None = None, secret: str | None = None) -> ProviderError:
    """An error delivered inside a 200 stream (OpenAI/Groq ``data: {"error": …}``, Groq and Anthropic
    ``event: error``). Retryable unless the payload says otherwise: most are overloads or server errors."""
    error = _error_object(payload)
    message = _text(error.get("message"))
    codes = _codes(error)
    status = error.get("status_code") if isinstance(error.get("status_code"), int) else None
    kind: ErrorKind | None = None
    for code in codes:
        if code in _QUOTA_CODES:
            kind = ErrorKind.BILLING_QUOTA
            break
        if code in _TYPE_KINDS:
            kind = _TYPE_KINDS[code]
            break
    if kind is None:
        kind = _kind_from(status, codes, message)
    if isinstance(payload, Mapping) and not request_id:
        request_id = _request_id({}, payload)
    return ProviderError(
        kind=kind,
        retryable=kind in RETRYABLE_KINDS,
        message=scrub(message or "The provider reported an error mid-stream.", secret),
        request_id=request_id,
        status=status,
        code=codes[0] if codes else None,
    )


def classify_transport_error(exc: BaseException) -> ProviderError:
    """httpx / decoder exceptions. Messages are ours: exception text can carry URLs and socket details."""
    if isinstance(exc, EgressDenied):
        # The refusal says what the host resolved to: the operator's log gets it, the user the generic words.
        logger.warning("provider call refused by the egress policy: %s", exc)
        return ProviderError(kind=ErrorKind.BLOCKED, retryable=False, message=NOT_ALLOWED_MESSAGE)
    if isinstance(exc, httpx.ConnectTimeout):
        return ProviderError(kind=ErrorKind.TIMEOUT, retryable=True, message="Connecting to the provider timed out.")
    if isinstance(exc, httpx.ReadTimeout):
        return ProviderError(
            kind=ErrorKind.TIMEOUT, retryable=True, message="The provider stalled: no data within the read timeout."
        )
    if isinstance(exc, httpx.TimeoutException):
        return ProviderError(kind=ErrorKind.TIMEOUT, retryable=True, message="The provider call timed out.")
    if isinstance(exc, httpx.ConnectError):
        return ProviderError(kind=ErrorKind.NETWORK, retryable=True, message="Could not connect to the provider.")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return ProviderError(
            kind=ErrorKind.NETWORK, retryable=True, message="The provider closed the connection mid-response."
        )
    if isinstance(exc, SSEProtocolError):
        return ProviderError(kind=ErrorKind.PROTOCOL, retryable=False, message=str(exc))
    return ProviderError(
        kind=ErrorKind.NETWORK, retryable=True, message=f"Provider call failed ({type(exc).__name__})."
    )
