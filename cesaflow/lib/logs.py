"""Structured logs for production: one JSON object per line on stderr (``CESAFLOW_LOG_FORMAT=json``).

Each line has ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger`` and ``message``, and when known the
``request_id``, ``org_id`` and ``run_id`` of the request or run that logged it (``cesaflow.lib.request_context``),
plus the access log's fields (``method``, ``path``, ``status``, ``duration_ms``) on ``cesaflow.access`` lines.
Identifiers only: log calls never carry prompts, answers, command output or secrets, and the redacting filter
(``cesaflow.lib.redact``) still runs first as the second line of defence. A traceback is one ``exc`` string.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from cesaflow.lib import request_context

# Extra attributes a log call may pass (``logger.info(..., extra={...})``) that become JSON fields.
EXTRA_FIELDS: Final = ("method", "path", "status", "duration_ms", "event")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = request_context.current()
        if context.request_id:
            line["request_id"] = context.request_id
        line.update(context.log_fields)
        for name in EXTRA_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # already formatted (and redacted) by the filter
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return orjson.dumps(line, default=str).decode()


class PlainFormatter(logging.Formatter):
    """Development's readable lines, with the request id when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = request_context.current()
        if context.request_id:
            ids = " ".join(f"{name}={value}" for name, value in context.log_fields.items())
            text = f"{text} [request_id={context.request_id}{' ' + ids if ids else ''}]"
        return text
