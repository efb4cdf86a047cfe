"""Executing one tool call against the run's workspace.

Every failure a model can cause (a bad path, a missing file, an ambiguous edit, a failing or hanging command, commands
being off) comes back as a ``ToolResult`` with ``ok=False``: an observation the model can act on, never an
exception that ends the run. The blocking file functions run in a worker thread so a large tree or a slow disk never
stalls the event loop that streams other runs.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings

from runs.agent.limits import AgentLimits
from runs.agent.tools import RUN_COMMAND, TOOLS_BY_NAME, truncate
from runs.workspaces import (
    FileChange,
    SandboxUnavailable,
    WorkspaceError,
    delete_file,
    edit_file,
    list_files,
    read_file,
    run_command,
    usage,
    write_file,
)

OutputCallback = Callable[[str], Awaitable[None]]

RESULT_SUMMARY_MAX_CHARS = 200


@dataclass(frozen=True, slots=True)
class ToolResult:
    """One call's outcome: ``content`` goes to the model, ``summary`` (one short line) to watchers."""

    ok: bool
    content: str
    summary: str
    change: FileChange | None = None
    cancelled: bool = False  # the stop event interrupted the call: the run ends, the result goes nowhere


def failure(message: str, summary: str | None = None) -> ToolResult:
    one_line = " ".join((summary or message).split())
    return ToolResult(ok=False, content=f"Error: {message}", summary=truncate(one_line, RESULT_SUMMARY_MAX_CHARS))


def commands_off() -> ToolResult:
    """The answer to a run_command call in a run without commands (the tool is not even offered then)."""
    return failure(
        "run_command is not available in this run: commands are turned off for this organization. "
        "Work with the file tools only.",
        "commands are turned off",
    )


def _seconds(value: float) -> str:
    return f"{round(value, 1):g}"


def _size(count: int) -> str:
    return "1 byte" if count == 1 else f"{count} bytes"


async def execute_tool(
    name: str,
    arguments: dict[str, Any],
    *,
    root: Path,
    limits: AgentLimits,
    allow_commands: bool,
    stop: asyncio.Event,
    time_left_s: float,
    on_output: OutputCallback,
) -> ToolResult:
    """Run one validated call (``finish`` is the loop's business, not this function's)."""
    if name == RUN_COMMAND:
        if not allow_commands:
            return commands_off()
        return await _run_command(
            arguments, root=root, limits=limits, stop=stop, time_left_s=time_left_s, on_output=on_output
        )
    if name not in TOOLS_BY_NAME:  # pragma: no cover - the loop checks names before calling
        return failure(f"Unknown tool {name!r}.")
    try:
        return await asyncio.to_thread(_file_tool, name, arguments, root)
    except WorkspaceError as exc:
        return failure(str(exc))
    except OSError as exc:
        # Anything else the filesystem says (a full disk, a permission a command changed): the generic errno text
        # only, which never names a host path.
        return failure(f"The file operation failed: {os.strerror(exc.errno or errno.EIO)}.")
    except (ValueError, UnicodeError):
        # Whatever slipped past argument checking is still the model's input, never a crash of the run.
        return failure("The file operation failed: invalid arguments.")


def _file_tool(name: str, arguments: dict[str, Any], root: Path) -> ToolResult:
    if name == "list_files":
        listing = list_files(root, arguments.get("path", "."), arguments.get("max_depth", 3))
        return ToolResult(ok=True, content=listing, summary=f"listed {listing.count(chr(10))} entries")
    if name == "read_file":
        text = read_file(root, arguments["path"], arguments.get("start_line"), arguments.get("end_line"))
        return ToolResult(ok=True, content=text, summary=f"read {_size(len(text.encode()))}")
    if name == "write_file":
        change = write_file(root, arguments["path"], arguments["content"])
        verb = "Created" if change.op == "created" else "Overwrote"
        return ToolResult(
            ok=True,
            content=f"{verb} {change.path} ({_size(change.bytes)}).",
            summary=f"wrote {_size(change.bytes)}",
            change=change,
        )
    if name == "edit_file":
        change = edit_file(root, arguments["path"], arguments["old_str"], arguments["new_str"])
        return ToolResult(
            ok=True,
            content=f"Edited {change.path}: replaced the one occurrence of old_str ({_size(change.bytes)} now).",
            summary=f"edited, {_size(change.bytes)} now",
            change=change,
        )
    if name == "delete_file":
        change = delete_file(root, arguments["path"])
        return ToolResult(ok=True, content=f"Deleted {change.path}.", summary="deleted", change=change)
    raise AssertionError(f"not a file tool: {name}")  # pragma: no cover


async def _run_command(
    arguments: dict[str, Any],
    *,
    root: Path,
    limits: AgentLimits,
    stop: asyncio.Event,
    time_left_s: float,
    on_output: OutputCallback,
) -> ToolResult:
    command: str = arguments["command"]
    if not command.strip():
        return failure("command is empty.")
    requested = float(arguments.get("timeout_s", limits.command_timeout_s))
    timeout = min(requested, limits.command_timeout_cap_s)
    note = ""
    if requested > limits.command_timeout_cap_s:
        note = f"[timeout_s lowered to the cap of {limits.command_timeout_cap_s:g} s]\n"
    # The run's own clock bounds every command too: a command may not outlive the run's wall-clock budget.
    bounded_by_run = time_left_s < timeout
    timeout = max(min(timeout, time_left_s), 0.001)

    async def forward(_stream: str, text: str) -> None:
        await on_output(text)

    try:
        result = await run_command(
            root,
            command,
            timeout_s=timeout,
            on_output=forward,
            stop=stop,
            max_bytes=int(settings.WORKSPACE_MAX_BYTES),
            max_files=int(settings.WORKSPACE_MAX_FILES),
        )
    except WorkspaceError as exc:
        return failure(str(exc))
    except SandboxUnavailable:
        return failure(
            "commands cannot run right now: the sandbox is unavailable on this server. Work with the file tools.",
            "sandbox unavailable",
        )
    if result.cancelled:
        return ToolResult(ok=False, content="The command was cancelled.", summary="cancelled", cancelled=True)
    if result.over_limit:
        over = await asyncio.to_thread(_over_caps, root)
        return ToolResult(
            ok=False,
            content=f"The command was killed: {over or 'the workspace grew over its limit.'}\n"
            f"Output so far:\n{result.output}",
            summary="killed: workspace over its limit",
        )
    if result.timed_out:
        seconds = _seconds(timeout)
        why = "the run's time limit" if bounded_by_run else f"its {seconds} s timeout"
        return ToolResult(
            ok=False,
            content=f"{note}The command was killed after {seconds} s ({why}).\nOutput so far:\n{result.output}",
            summary=f"timed out after {seconds} s",
        )
    code = result.exit_code
    content = f"{note}Exit code: {code}\nOutput:\n{result.output}" if result.output else f"{note}Exit code: {code}"
    over = await asyncio.to_thread(_over_caps, root)
    if over:
        # The file tools refuse to grow a full workspace, but a command can: the model must clean up first.
        return ToolResult(
            ok=False, content=f"{content}\nError: {over}", summary=f"exit {code}; workspace over its limit"
        )
    return ToolResult(ok=code == 0, content=content, summary=f"exit {code}")


def _over_caps(root: Path) -> str:
    """What is over the workspace caps after a command ("" when nothing): file tools check before they write,
    a command can only be checked after it ran (providers.md §2.2, "check after each write/command")."""
    total, count = usage(root)
    max_bytes = int(settings.WORKSPACE_MAX_BYTES)
    max_files = int(settings.WORKSPACE_MAX_FILES)
    if total > max_bytes:
        return (
            f"the workspace now holds {total} bytes, over its limit of {max_bytes} bytes. Delete files you do not "
            "need before going on."
        )
    if count > max_files:
        return f"the workspace now holds {count} files, over its limit of {max_files}. Delete files before going on."
    return ""
