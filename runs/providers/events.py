"""Provider-neutral stream events (providers.md §1.9). Adapters yield only these; nothing downstream sees provider
bytes.

Contract of one ``stream_chat`` call, in order:

* zero or more ``Retry`` events (only before the first content event: a failed attempt is retried only if the
  consumer has not seen any of its content);
* content: ``TextDelta``, ``ToolCallStart`` / ``ToolCallArgsDelta`` / ``ToolCallEnd``, and ``Ping``;
* one ``Usage`` per attempt that got a streaming (2xx) response; the consumer adds them up. ``complete`` is false
  when the provider did not report final usage (an interrupted stream): the counts are then lower bounds or None;
* exactly one terminal event, last: ``TurnEnd`` (the turn is complete, tool calls may be executed) or
  ``ProviderError`` (discard the partial turn; never execute a tool call from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class StopReason(StrEnum):
    END = "end"
    TOOL_USE = "tool_use"
    MAX_TOKENS = "max_tokens"
    CONTENT_FILTER = "content_filter"
    REFUSAL = "refusal"
    OTHER = "other"


class ErrorKind(StrEnum):
    # Provider-reported (HTTP status or in-stream error payload), providers.md §1.6.
    AUTH = "auth"
    PERMISSION = "permission"
    BILLING_QUOTA = "billing_quota"
    RATE_LIMIT = "rate_limit"
    OVERLOADED = "overloaded"
    SERVER = "server"
    BAD_REQUEST = "bad_request"
    MODEL_TOOL_ERROR = "model_tool_error"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    # Detected on our side.
    INCOMPLETE = "incomplete"  # the stream ended without [DONE] / message_stop or without a stop reason
    TIMEOUT = "timeout"  # connect timeout or read silence longer than the read timeout
    DEADLINE = "deadline"  # the wall-clock deadline of the call passed
    NETWORK = "network"  # connection refused, reset or dropped mid-body
    PROTOCOL = "protocol"  # the upstream sent something that is not the dialect's event stream
    BLOCKED = "blocked"  # the egress policy refused the destination (SSRF guard)


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    call_id: str
    name: str
    position: int  # 0, 1, … in the order the calls appear in this turn


@dataclass(frozen=True, slots=True)
class ToolCallArgsDelta:
    position: int
    fragment: str


@dataclass(frozen=True, slots=True)
class ToolCallEnd:
    position: int
    arguments_json: str  # the raw string as received; it may be invalid JSON (the model's fault, not ours)


@dataclass(frozen=True, slots=True)
class TurnEnd:
    stop: StopReason
    raw_reason: str | None


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int | None
    output_tokens: int | None
    cached_input_tokens: int | None = None
    complete: bool = True


@dataclass(frozen=True, slots=True)
class ProviderError:
    kind: ErrorKind
    retryable: bool
    message: str  # provider text with any key scrubbed, or our own description; never prompts or outputs
    retry_after_s: float | None = None
    request_id: str | None = None
    status: int | None = None  # the HTTP status, when the error came from one (the proxy re-emits it)
    code: str | None = None  # the provider's error code/type, e.g. "insufficient_quota", "tool_use_failed"


@dataclass(frozen=True, slots=True)
class Ping:
    """The upstream is alive (Anthropic ping events); useful to keep a "still working" indicator fresh."""


@dataclass(frozen=True, slots=True)
class Retry:
    """The previous attempt failed before any content; another attempt starts after ``delay_s``."""

    attempt: int  # 1 for the first retry
    delay_s: float
    error: ProviderError


@dataclass(frozen=True, slots=True)
class ReadEnd:
    """The events yielded since the last ``ReadEnd`` are all that arrived: the next read may wait for the network, so a
    consumer forwarding them writes its batch now. Only adapters with ``mark_reads`` set yield it (the proxy's: one
    client write per wait, not per HTTP chunk). The first content is marked at once; after it, the reads that return
    without waiting (``cesaflow.lib.http.body_bytes_received``) join one batch, at most ``MAX_READS_PER_MARK``."""


ProviderEvent = (
    TextDelta
    | ToolCallStart
    | ToolCallArgsDelta
    | ToolCallEnd
    | TurnEnd
    | Usage
    | ProviderError
    | Ping
    | Retry
    | ReadEnd
)
CONTENT_EVENTS = (TextDelta, ToolCallStart, ToolCallArgsDelta, ToolCallEnd)
