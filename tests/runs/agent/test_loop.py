"""The agent loop over the wire: each dialect's adapter against the simulator, with real tools in a real workspace.

The simulator validates every request like the real APIs (tool results must answer every call, in order), so a run
that gets past its second turn also proves the history the loop sends back is well-formed in that dialect.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from runs.simulator.scenarios import AGENT_CANARY_CONTENT
from runs.workspaces import FileChange
from tests.runs.agent.conftest import FLAVOURS

pytestmark = pytest.mark.parametrize("flavour", FLAVOURS)


def _tool_names(flavour: str, body: dict[str, Any]) -> list[str]:
    if flavour == "anthropic":
        return [tool["name"] for tool in body["tools"]]
    return [tool["function"]["name"] for tool in body["tools"]]


def _tool_results(flavour: str, body: dict[str, Any]) -> list[tuple[str, bool]]:
    """(content, is_error) of every tool result in a request, in order."""
    found: list[tuple[str, bool]] = []
    for message in body["messages"]:
        if flavour == "anthropic":
            if message["role"] == "user" and isinstance(message["content"], list):
                found += [
                    (block["content"], bool(block.get("is_error")))
                    for block in message["content"]
                    if block.get("type") == "tool_result"
                ]
        elif message["role"] == "tool":
            # Chat Completions has no error flag: the text says it.
            found.append((message["content"], message["content"].startswith("Error:")))
    return found


async def test_agent_demo_builds_a_tested_package(flavour, run_agent_with, workspace, simulator):
    run = await run_agent_with(flavour, "fake/agent_demo")

    assert run.outcome.status == "succeeded", run.outcome
    assert run.outcome.steps == 5
    assert "greeting package" in run.outcome.summary
    assert run.sink.text_streamed.startswith("I'll create a small Python package with a test.")
    assert (workspace / "greeting" / "__init__.py").read_text().count('return f"Hello, {name}!"') == 1
    assert (workspace / "tests" / "test_greeting.py").is_file()
    assert (workspace / "README.md").read_text().startswith("# greeting")
    # The unittest run in the sandbox passed, and its output streamed while it ran.
    assert ("run_command", True, "exit 0") in run.sink.results()
    assert "Ran 2 tests" in run.sink.command_output_streamed
    assert "OK" in run.sink.command_output_streamed
    assert [(c.path, c.op) for c in run.sink.changes()] == [
        ("greeting/__init__.py", "created"),
        ("tests/test_greeting.py", "created"),
        ("README.md", "created"),
    ]
    steps = run.sink.of("turn_started")
    assert [(step, max_steps) for step, max_steps, _in, _out in steps] == [(n, 40) for n in range(1, 6)]
    assert steps[-1][2] > 0  # tokens so far are reported with each step
    assert len(run.sink.of("usage")) == 5
    # The model saw the command's exit code and output in its next turn.
    fourth = simulator.requests()[3]["body"]
    command_result, is_error = _tool_results(flavour, fourth)[-1]
    assert command_result.startswith("Exit code: 0")
    assert "Ran 2 tests" in command_result
    assert not is_error
    assert run.elapsed_s < 6


async def test_tools_are_declared_once_per_dialect_with_their_schemas(flavour, run_agent_with, simulator):
    await run_agent_with(flavour, "fake/tool_write")

    body = simulator.requests()[0]["body"]
    assert _tool_names(flavour, body) == [
        "list_files",
        "read_file",
        "write_file",
        "edit_file",
        "delete_file",
        "run_command",
        "finish",
    ]
    system = body["system"] if flavour == "anthropic" else body["messages"][0]["content"]
    assert "relative to the workspace root" in system
    assert "do not persist" in system
    assert "no network" in system


async def test_unknown_tool_is_an_observation_and_the_run_continues(flavour, run_agent_with, simulator):
    run = await run_agent_with(flavour, "fake/unknown_tool")

    assert run.outcome.status == "succeeded"
    assert run.sink.results()[0] == ("rm_rf", False, "unknown tool")
    [(content, is_error)] = _tool_results(flavour, simulator.requests()[1]["body"])
    assert "Unknown tool 'rm_rf'" in content
    assert "write_file" in content
    assert is_error


async def test_invalid_json_arguments_are_an_observation(flavour, run_agent_with, workspace, simulator):
    run = await run_agent_with(flavour, "fake/bad_tool_args")

    assert run.outcome.status == "succeeded"
    name, ok, summary = run.sink.results()[0]
    assert (name, ok) == ("write_file", False)
    assert "not valid JSON" in summary
    assert (workspace / "main.py").read_text() == "print(1)\n"
    second = simulator.requests()[1]["body"]
    [(content, is_error)] = _tool_results(flavour, second)[:1]
    assert "not valid JSON" in content
    assert is_error
    # The broken arguments are not replayed: OpenAI-compatible servers may refuse them in the history.
    if flavour != "anthropic":
        [assistant] = [m for m in second["messages"] if m["role"] == "assistant"]
        assert assistant["tool_calls"][0]["function"]["arguments"] == "{}"


async def test_commands_off_are_not_offered_and_a_call_is_refused(flavour, run_agent_with, workspace, simulator):
    run = await run_agent_with(flavour, "fake/multi_turn_build", allow_commands=False)

    assert run.outcome.status == "succeeded"
    for entry in simulator.requests():
        assert "run_command" not in _tool_names(flavour, entry["body"])
    assert ("run_command", False, "commands are turned off") in run.sink.results()
    assert run.sink.of("command_output") == []
    assert (workspace / "app.py").read_text() == "x = 2\n"  # the steps after the refusal still ran
    content, is_error = _tool_results(flavour, simulator.requests()[2]["body"])[-1]
    assert "commands are turned off" in content
    assert is_error


async def test_a_cut_off_tool_call_is_never_run(flavour, run_agent_with, workspace, simulator):
    run = await run_agent_with(flavour, "fake/length_cutoff")

    # Every turn is cut off mid-call: nothing runs, the model is told each time, three in a row end the run.
    assert (run.outcome.status, run.outcome.error_kind) == ("failed", "tool_errors")
    assert run.outcome.steps == 3
    assert not (workspace / "big.py").exists()
    assert run.sink.changes() == []
    content, is_error = _tool_results(flavour, simulator.requests()[1]["body"])[-1]
    assert "cut off at the output token limit" in content
    assert is_error


async def test_written_content_never_reaches_the_sink(flavour, run_agent_with, workspace):
    run = await run_agent_with(flavour, "fake/agent_canary_write")

    assert run.outcome.status == "succeeded"
    assert (workspace / "secret.txt").read_text() == AGENT_CANARY_CONTENT
    [(_call_id, name, arguments), _finish] = run.sink.of("tool_call")
    assert (name, arguments) == ("write_file", {"path": "secret.txt", "bytes": len(AGENT_CANARY_CONTENT)})
    assert run.sink.changes() == [FileChange(path="secret.txt", op="created", bytes=len(AGENT_CANARY_CONTENT))]
    marker = AGENT_CANARY_CONTENT.split(":")[0]
    assert marker not in repr(run.sink.calls)
    assert marker not in json.dumps([repr(arguments) for _name, arguments in run.sink.calls])


async def test_a_provider_error_fails_the_run_with_its_kind(flavour, run_agent_with):
    run = await run_agent_with(flavour, "fake/401")

    assert (run.outcome.status, run.outcome.error_kind) == ("failed", "auth")
    assert run.outcome.provider_error is not None
    assert run.outcome.error_message == "The model provider returned an error (auth)."
    assert run.outcome.steps == 1
