"""The pieces of the loop that need no provider: tool schemas and argument checks, what watchers are shown of a
call, the limits and their caps, stuck detection, and tool execution edge cases against the real sandbox."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from runs.agent import TOOLS, AgentLimits, tool_specs
from runs.agent.actions import execute_tool
from runs.agent.stuck import StuckDetector, Verdict
from runs.agent.tools import TOOLS_BY_NAME, ArgumentError, parse_arguments, summarise_arguments
from runs.workspaces import sandbox

# --- Tool specs -------------------------------------------------------------------------------------------------


def test_every_tool_schema_is_a_closed_object_with_its_required_arguments_declared():
    assert [t.name for t in TOOLS] == [
        "list_files",
        "read_file",
        "write_file",
        "edit_file",
        "delete_file",
        "run_command",
        "finish",
    ]
    for tool in TOOLS:
        schema = tool.parameters
        assert schema["type"] == "object"
        assert schema["additionalProperties"] is False
        assert set(schema["required"]) <= set(schema["properties"])
        assert all("type" in prop for prop in schema["properties"].values())
        json.dumps(schema)  # plain JSON: the adapters send it as is


def test_without_commands_run_command_is_not_offered():
    assert "run_command" not in [t.name for t in tool_specs(allow_commands=False)]
    assert tool_specs(allow_commands=True) == TOOLS


# --- Argument checks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "raw", "message"),
    [
        ("write_file", '{"path": "a.py", "content": ', "not valid JSON"),
        ("write_file", '["a.py", "x"]', "must be a JSON object, not an array"),
        ("write_file", '{"path": "a.py"}', "missing required argument(s): content"),
        ("write_file", '{"path": "a.py", "content": "", "mode": "w"}', "has no argument(s) 'mode'"),
        ("write_file", '{"path": 3, "content": ""}', "'path' must be a string, not a number"),
        ("read_file", '{"path": "a", "start_line": true}', "'start_line' must be a integer"),
        ("read_file", '{"path": "a", "start_line": 1.5}', "whole number"),
        ("read_file", '{"path": "a", "start_line": 0}', "at least 1"),
        ("run_command", '{"command": "ls", "timeout_s": 0}', "greater than 0"),
        ("finish", "null", "must be a JSON object, not null"),
    ],
)
def test_bad_arguments_are_explained_to_the_model(tool, raw, message):
    with pytest.raises(ArgumentError, match=re.escape(message)):
        parse_arguments(TOOLS_BY_NAME[tool], raw)


def test_good_arguments_are_returned_normalised():
    assert parse_arguments(TOOLS_BY_NAME["read_file"], '{"path": "a", "start_line": 2.0}') == {
        "path": "a",
        "start_line": 2,
    }
    assert parse_arguments(TOOLS_BY_NAME["list_files"], "") == {}


# --- What watchers see --------------------------------------------------------------------------------------------


def test_file_content_is_summarised_as_sizes():
    content = "é" * 10
    write = json.dumps({"path": "a.txt", "content": content, "extra": "hidden content"})
    assert summarise_arguments("write_file", write) == {"path": "a.txt", "bytes": 20}
    edit = json.dumps({"path": "a.txt", "old_str": "abc", "new_str": "abcd"})
    assert summarise_arguments("edit_file", edit) == {"path": "a.txt", "old_bytes": 3, "new_bytes": 4}
    # Invalid JSON may still hold content: nothing of it is shown.
    assert summarise_arguments("write_file", '{"path": "a", "content": "secret') == {}


def test_other_arguments_are_cut_short():
    summary = summarise_arguments("run_command", json.dumps({"command": "x" * 500, "timeout_s": 5, "env": {"A": 1}}))
    assert len(summary["command"]) == 200
    assert summary["timeout_s"] == 5
    assert summary["env"] == "<object>"


# --- Limits -------------------------------------------------------------------------------------------------------


def test_limits_merge_overrides_within_the_caps():
    limits = AgentLimits().merged({"max_steps": 10, "wall_clock_s": 60, "command_timeout_cap_s": 30})
    assert (limits.max_steps, limits.wall_clock_s, limits.command_timeout_cap_s) == (10, 60, 30)
    assert limits.command_timeout_s == 30  # the default timeout follows a lower cap down


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_steps": 0}, "max_steps must be at least 1"),
        ({"max_steps": 201}, "max_steps must be at most 200"),
        ({"max_steps": 2.5}, "max_steps must be a whole number"),
        ({"max_steps": True}, "max_steps must be a number"),
        ({"max_tokens": 5_000_001}, "max_tokens must be at most 5e+06"),
        ({"wall_clock_s": 7201}, "wall_clock_s must be at most 7200"),
        ({"wall_clock_s": float("nan")}, "wall_clock_s must be a positive number"),
        ({"command_timeout_s": 301}, "command_timeout_s must not exceed command_timeout_cap_s"),
        ({"command_timeout_cap_s": 1801}, "command_timeout_cap_s must be at most 1800"),
        ({"max_consecutive_errors": "3"}, "max_consecutive_errors must be a number"),
        ({"shell": "zsh"}, "Unknown agent limit 'shell'"),
    ],
)
def test_limits_refuse_bad_overrides_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AgentLimits().merged(overrides)


# --- Stuck detection ----------------------------------------------------------------------------------------------


def test_the_same_step_warns_at_three_and_stops_at_four():
    detector = StuckDetector()
    step = [("run_command", '{"command": "ls"}', "Exit code: 0")]
    # Key order and spacing do not hide a repeat.
    same = [("run_command", '{ "command":"ls" }', "Exit code: 0")]
    assert [detector.observe(s) for s in (step, same, step, same)] == [
        Verdict.OK,
        Verdict.OK,
        Verdict.WARN,
        Verdict.STUCK,
    ]


def test_a_different_result_is_progress():
    detector = StuckDetector()
    for n in range(6):
        assert detector.observe([("run_command", '{"command": "ls"}', f"Exit code: 0\n{n}")]) is Verdict.OK


def test_alternating_steps_are_stuck_after_six():
    detector = StuckDetector()
    a = [("list_files", "{}", "./")]
    b = [("read_file", '{"path": "x"}', "Error: No such file")]
    verdicts = [detector.observe(step) for step in (a, b, a, b, a, b)]
    assert verdicts == [Verdict.OK] * 5 + [Verdict.STUCK]


# --- Tool execution edge cases ------------------------------------------------------------------------------------


async def _output(_text: str) -> None:
    return None


async def test_a_timeout_above_the_cap_is_lowered_and_said(workspace):
    limits = AgentLimits(command_timeout_s=0.2, command_timeout_cap_s=0.3)
    result = await execute_tool(
        "run_command",
        {"command": "sleep 5", "timeout_s": 100},
        root=workspace,
        limits=limits,
        allow_commands=True,
        stop=asyncio.Event(),
        time_left_s=60,
        on_output=_output,
    )
    assert not result.ok
    assert result.summary == "timed out after 0.3 s"
    assert "lowered to the cap of 0.3 s" in result.content


async def test_an_unavailable_sandbox_is_an_observation(workspace, monkeypatch):
    monkeypatch.setattr(sandbox, "BWRAP", "/nonexistent/bwrap")
    result = await execute_tool(
        "run_command",
        {"command": "true"},
        root=workspace,
        limits=AgentLimits(),
        allow_commands=True,
        stop=asyncio.Event(),
        time_left_s=60,
        on_output=_output,
    )
    assert (result.ok, result.summary) == (False, "sandbox unavailable")
    assert result.content.startswith("Error: commands cannot run right now")


async def test_a_command_that_overfills_the_workspace_is_told_to_clean_up(workspace, settings):
    settings.WORKSPACE_MAX_BYTES = 1000
    result = await execute_tool(
        "run_command",
        {"command": "head -c 5000 /dev/zero > big.bin"},
        root=workspace,
        limits=AgentLimits(),
        allow_commands=True,
        stop=asyncio.Event(),
        time_left_s=60,
        on_output=_output,
    )
    assert (result.ok, result.summary) == (False, "exit 0; workspace over its limit")
    assert "the workspace now holds 5000 bytes, over its limit of 1000 bytes" in result.content


@pytest.mark.parametrize(
    ("name", "arguments"),
    [
        ("run_command", '{"command": "true", "timeout_s": ' + "1" + "0" * 400 + "}"),
        ("read_file", '{"path": "a\\ud800"}'),
        ("run_command", '{"command": "echo \\ud800"}'),
    ],
)
def test_arguments_python_cannot_use_are_argument_errors_not_crashes(name: str, arguments: str) -> None:
    with pytest.raises(ArgumentError):
        parse_arguments(TOOLS_BY_NAME[name], arguments)


def test_a_limit_with_hundreds_of_digits_is_a_value_error() -> None:
    from runs.agent import AgentLimits

    with pytest.raises(ValueError, match="wall_clock_s"):
        AgentLimits().merged({"wall_clock_s": 10**400})
