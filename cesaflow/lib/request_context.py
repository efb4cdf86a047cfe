"""Who is asking, from where: set per request by middleware, read by the audit trail and the logs.

``log_fields`` holds what a request or a run comes to be about once it is known (the org, the run), for the
structured logs (``cesaflow.lib.logs``): identifiers only, never content. It is a dict shared by everything the
request runs, thread hops included (a context copied into a thread still points at the same dict), so a field noted
deep in a view is on the request's last log line too.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

# The fields ``note`` accepts: identifiers the logs may carry.
LOG_FIELDS = ("org_id", "run_id")


@dataclass(frozen=True)
class RequestContext:
    ip: str | None = None
    user_agent: str = ""
    request_id: str = ""
    log_fields: dict[str, str] = field(default_factory=dict, compare=False)


_current: ContextVar[RequestContext | None] = ContextVar("cesaflow_request_context", default=None)


def current() -> RequestContext:
    return _current.get() or RequestContext()


def bind(context: RequestContext) -> object:
    return _current.set(context)


def unbind(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]


def note(**fields: object) -> None:
    """Attach identifiers (``org_id``, ``run_id``) to the current request's or run's log lines. Outside a bound
    context (a management command, a test) there is nothing to attach to, and nothing happens."""
    context = _current.get()
    if context is None:
        return
    for name, value in fields.items():
        if name not in LOG_FIELDS:
            raise ValueError(f"{name} is not a log field")
        context.log_fields[name] = str(value)
