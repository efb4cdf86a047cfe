"""Who is asking, from where: set per request by middleware, read by the audit trail."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestContext:
    ip: str | None = None
    user_agent: str = ""
    request_id: str = ""


_current: ContextVar[RequestContext | None] = ContextVar("cesaflow_request_context", default=None)


def current() -> RequestContext:
    return _current.get() or RequestContext()


def bind(context: RequestContext) -> object:
    return _current.set(context)


def unbind(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]
