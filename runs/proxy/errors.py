"""OpenAI-shaped errors: request validation failures and provider failures as the HTTP answers that make the stock
``openai`` SDK raise the matching exception class."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cesaflow.lib.api import DATABASE_RETRY_AFTER_SECONDS, DATABASE_UNAVAILABLE_CODE, DATABASE_UNAVAILABLE_MESSAGE
from runs.providers.events import ErrorKind, ProviderError


class ProxyError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``.

    The SDK picks its exception class from the HTTP status alone (400 BadRequestError, 401 AuthenticationError,
    403 PermissionDeniedError, 404 NotFoundError, 429 RateLimitError, >=500 InternalServerError), and reads
    ``retry-after`` and ``x-should-retry`` to decide whether to retry.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ProxyError:
    return ProxyError(400, message, param=param, code=code)


def database_unavailable() -> ProxyError:
    """The database cannot be reached (PostgreSQL restarting, the pool out of connections): the rest of the API's
    503 ``database_unavailable`` with ``Retry-After`` (``cesaflow.lib.api``), in OpenAI's shape. The SDKs retry it."""
    return ProxyError(
        503,
        DATABASE_UNAVAILABLE_MESSAGE,
        type="server_error",
        code=DATABASE_UNAVAILABLE_CODE,
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS), "Cache-Control": "no-store"},
    )


# Our own explanation per kind: the run row stores this, never the provider's text (it can quote the request).
ERROR_SUMMARIES: dict[ErrorKind, str] = {
    ErrorKind.AUTH: "The provider rejected the key.",
    ErrorKind.PERMISSION: "The key may not use this model or operation.",
    ErrorKind.BILLING_QUOTA: "The provider account is out of quota or credit.",
    ErrorKind.RATE_LIMIT: "The provider rate-limited the call.",
    ErrorKind.OVERLOADED: "The provider is overloaded.",
    ErrorKind.SERVER: "The provider had a server error.",
    ErrorKind.BAD_REQUEST: "The provider refused the request.",
    ErrorKind.MODEL_TOOL_ERROR: "The model produced an invalid tool call.",
    ErrorKind.NOT_FOUND: "The provider does not know this model.",
    ErrorKind.TOO_LARGE: "The request is too large for the model.",
    ErrorKind.INCOMPLETE: "The provider ended the stream early.",
    ErrorKind.TIMEOUT: "The provider timed out.",
    ErrorKind.DEADLINE: "The call exceeded its deadline.",
    ErrorKind.NETWORK: "The connection to the provider failed.",
    ErrorKind.PROTOCOL: "The provider sent an unreadable stream.",
    ErrorKind.BLOCKED: "The provider address is not allowed by the egress policy.",
}

# Kinds the adapter already retried (with backoff, before the first token): the client is told not to retry again
# (``x-should-retry: false``), so one request never becomes nine provider calls. Rate limits are left to the
# client, which waits for the forwarded ``retry-after``.
_ALREADY_RETRIED = frozenset(
    {ErrorKind.OVERLOADED, ErrorKind.SERVER, ErrorKind.TIMEOUT, ErrorKind.NETWORK, ErrorKind.INCOMPLETE}
)


def error_for_provider(error: ProviderError, *, key_label: str) -> ProxyError:
    """The HTTP answer for a provider failure that happened before anything was streamed."""
    kind = error.kind
    message = error.message
    headers: dict[str, str] = {}
    if error.request_id:
        headers["x-upstream-request-id"] = error.request_id
    if kind in _ALREADY_RETRIED:
        headers["x-should-retry"] = "false"
    status: int
    type_ = "api_error"
    code = error.code
    if kind is ErrorKind.AUTH:
        status, type_, code = 401, "authentication_error", "provider_key_invalid"
        message = (
            f"The provider rejected the stored key {key_label!r}: {error.message} "
            "An admin of the organization must check or replace it."
        )
    elif kind is ErrorKind.PERMISSION:
        status, type_ = 403, "permission_error"
    elif kind is ErrorKind.BILLING_QUOTA:
        status, type_, code = 429, "insufficient_quota", "insufficient_quota"
        headers["x-should-retry"] = "false"  # waiting does not add credit
    elif kind is ErrorKind.RATE_LIMIT:
        status, type_, code = 429, "rate_limit_error", code or "rate_limit_exceeded"
        if error.retry_after_s is not None:
            headers["retry-after"] = str(max(1, math.ceil(error.retry_after_s)))
            headers["retry-after-ms"] = str(max(1, round(error.retry_after_s * 1000)))
    elif kind is ErrorKind.OVERLOADED:
        status, type_, code = 503, "overloaded_error", code or "overloaded"
    elif kind is ErrorKind.SERVER:
        upstream = error.status or 0
        status = upstream if 500 <= upstream <= 599 and upstream != 529 else 502
        type_ = "server_error"
    elif kind in (ErrorKind.TIMEOUT, ErrorKind.DEADLINE):
        status, type_, code = 504, "timeout_error", kind.value
    elif kind in (ErrorKind.NETWORK, ErrorKind.INCOMPLETE, ErrorKind.PROTOCOL, ErrorKind.BLOCKED):
        status, type_, code = 502, "upstream_error", kind.value
    elif kind is ErrorKind.NOT_FOUND:
        status, type_, code = 404, "invalid_request_error", "model_not_found"
    elif kind is ErrorKind.TOO_LARGE:
        upstream = error.status or 0
        status = upstream if 400 <= upstream <= 499 else 413
        type_ = "invalid_request_error"
    else:  # BAD_REQUEST, MODEL_TOOL_ERROR: the request (or the model's output) was refused
        status, type_ = 400, "invalid_request_error"
    return ProxyError(status, message, type=type_, code=code, headers=headers)
