"""Run events: the one JSON schema shared by websockets (browser) and SSE (IDEs and CLIs).

Every event has ``type``, ``run_id`` and ``seq`` (a per-run sequence number, increasing, starting at 1 for the
run's executor; snapshot events sent to a (re)connecting client carry ``seq`` 0). Events travel through the
channel layer to the run's group and, for status changes, to the org's group; nobody listening means the event
is gone: that is the retention policy for content.

Channel-layer messages wrap an event as ``{"type": "run.event", "event": {...}}``; consumers handle it in a
``run_event`` method and forward ``event`` as-is.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal, NotRequired, TypedDict

from asgiref.sync import async_to_sync
from channels.layers import BaseChannelLayer, get_channel_layer

from cesaflow.lib.channel_layer import send_to_groups
from runs.models import Run

EventType = Literal[
    "run.status",
    "text.delta",
    "usage",
    "error",
    "run.finished",
    "agent.step",
    "tool.call",
    "tool.result",
    "command.output",
    "file.changed",
]


class RunStatusEvent(TypedDict):
    type: Literal["run.status"]
    run_id: str
    seq: int
    status: str
    kind: str
    model: str
    provider: str
    objective: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    input_tokens: int
    output_tokens: int
    usage_complete: bool
    error_kind: str
    error_message: str
    # Queued only until a watcher attaches (start on attach): "waiting for you to open the run".
    waiting_for_watcher: bool
    # Agent runs: the workspace's state (live, available, downloaded, expired; "" for other kinds), until when it
    # can be downloaded, and how commands are sandboxed ("none" is unsafe and labelled so).
    workspace_state: str
    workspace_expires_at: str | None
    sandbox_mode: str
    # Set while the executor waits before retrying a failed provider call ("rate limited, retrying in 2 s").
    retrying_in_s: NotRequired[float]
    retry_reason: NotRequired[str]


class TextDeltaEvent(TypedDict):
    type: Literal["text.delta"]
    run_id: str
    seq: int
    text: str


class UsageEvent(TypedDict):
    type: Literal["usage"]
    run_id: str
    seq: int
    input_tokens: int
    output_tokens: int
    complete: bool


class ErrorEvent(TypedDict):
    type: Literal["error"]
    run_id: str
    seq: int
    kind: str
    message: str
    retryable: bool


class RunFinishedEvent(TypedDict):
    type: Literal["run.finished"]
    run_id: str
    seq: int
    status: str
    input_tokens: int
    output_tokens: int
    usage_complete: bool
    error_kind: str
    error_message: str
    workspace_state: str
    workspace_expires_at: str | None


class AgentStepEvent(TypedDict):
    """An agent run starts model turn ``step`` of at most ``max_steps``; token totals so far against the budget."""

    type: Literal["agent.step"]
    run_id: str
    seq: int
    step: int
    max_steps: int
    input_tokens: int
    output_tokens: int
    max_tokens: int


class ToolCallEvent(TypedDict):
    """The agent calls a tool. ``arguments`` is a summary: file content only as its size, long strings cut."""

    type: Literal["tool.call"]
    run_id: str
    seq: int
    call_id: str
    name: str
    arguments: dict[str, Any]


class ToolResultEvent(TypedDict):
    type: Literal["tool.result"]
    run_id: str
    seq: int
    call_id: str
    name: str
    ok: bool
    summary: str  # one line: "wrote 120 bytes", "exit 0", the refusal's reason


class CommandOutputEvent(TypedDict):
    """Output of the running command (stdout and stderr interleaved), coalesced like text deltas."""

    type: Literal["command.output"]
    run_id: str
    seq: int
    stream: str
    text: str


class FileChangedEvent(TypedDict):
    type: Literal["file.changed"]
    run_id: str
    seq: int
    path: str  # relative to the workspace root
    op: str  # created, modified, deleted
    bytes: int


RunEvent = (
    RunStatusEvent
    | TextDeltaEvent
    | UsageEvent
    | ErrorEvent
    | RunFinishedEvent
    | AgentStepEvent
    | ToolCallEvent
    | ToolResultEvent
    | CommandOutputEvent
    | FileChangedEvent
)


def run_group(run_id: uuid.UUID | str) -> str:
    """The channel-layer group of one run (derived server-side from an authorized run, never from input)."""
    return f"run.{uuid.UUID(str(run_id)).hex}"


def org_runs_group(org_id: uuid.UUID | str) -> str:
    """The channel-layer group carrying status changes of every run of one org."""
    return f"org.{uuid.UUID(str(org_id)).hex}.runs"


def run_control_group(run_id: uuid.UUID | str) -> str:
    """The group of the executor running this run: ``run.cancel`` messages only, no events (a separate group so
    the executor does not receive back every event it publishes)."""
    return f"run.{uuid.UUID(str(run_id)).hex}.control"


# Run executors (``run_worker`` processes) listening for "a run was queued" nudges. Its messages carry a run's id
# and nothing of its content, and only executors join it.
WORKERS_GROUP = "runs.workers"


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def status_event(run: Run, *, seq: int = 0) -> RunStatusEvent:
    """The run's current metadata as a ``run.status`` event (what a connecting client gets first)."""
    return {
        "type": "run.status",
        "run_id": str(run.id),
        "seq": seq,
        "status": run.status,
        "kind": run.kind,
        "model": run.model,
        "provider": run.provider,
        "objective": run.objective[:200],
        "created_at": run.created_at.isoformat(),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "input_tokens": run.input_tokens,
        "output_tokens": run.output_tokens,
        "usage_complete": run.usage_complete,
        "error_kind": run.error_kind,
        "error_message": run.error_message,
        "waiting_for_watcher": run.waiting_for_watcher,
        "workspace_state": run.workspace_state,
        "workspace_expires_at": _iso(run.workspace_expires_at),
        "sandbox_mode": run.sandbox_mode,
    }


def finished_event(run: Run, *, seq: int) -> RunFinishedEvent:
    return {
        "type": "run.finished",
        "run_id": str(run.id),
        "seq": seq,
        "status": run.status,
        "input_tokens": run.input_tokens,
        "output_tokens": run.output_tokens,
        "usage_complete": run.usage_complete,
        "error_kind": run.error_kind,
        "error_message": run.error_message,
        "workspace_state": run.workspace_state,
        "workspace_expires_at": _iso(run.workspace_expires_at),
    }


async def apublish(run: Run, event: RunEvent, *, layer: BaseChannelLayer | None = None) -> None:
    """Send ``event`` to the run's group; status and finish events also go to the org's group (live lists).

    ``layer``: the channel layer instance to use (an executor on its own event loop has its own); default the
    process's shared one.
    """
    layer = layer or get_channel_layer()
    if layer is None:
        return
    sends = [(run_group(run.id), {"type": "run.event", "event": dict(event)})]
    if event["type"] in ("run.status", "run.finished"):
        summary = status_event(run, seq=event["seq"]) if event["type"] == "run.finished" else event
        sends.append((org_runs_group(run.org_id), {"type": "run.event", "event": dict(summary)}))
    await send_to_groups(layer, sends)  # both groups' members looked up in one round trip


def publish(run: Run, event: RunEvent) -> None:
    """``apublish`` for sync code (services after commit)."""
    async_to_sync(apublish)(run, event)
