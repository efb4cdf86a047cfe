"""What bounds an agent run: path confinement, stuck detection, budgets, error streaks and the stop event.

These do not depend on the dialect, so each runs once (the flavours vary from test to test).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from runs.agent import AgentLimits
from tests.runs.agent.conftest import RecordingSink


def _sent(simulator) -> str:
    """Everything the loop sent to the provider, as one string."""
    return json.dumps([entry["body"] for entry in simulator.requests()])


async def test_paths_outside_the_workspace_are_refused(run_agent_with, workspace, simulator):
    run = await run_agent_with("openai", "fake/path_escape")

    assert run.outcome.status == "succeeded"
    [escape, absolute, link, finish] = run.sink.results()
    assert escape[:2] == ("write_file", False)
    assert "outside the workspace" in escape[2]
    assert absolute[:2] == ("write_file", False)
    assert "absolute paths are not allowed" in absolute[2]
    assert link == ("run_command", True, "exit 0")
    assert finish == ("finish", True, "finished")
    assert not Path("/etc/x").exists()
    assert not (workspace.parent.parent / "etc").exists()
    assert (workspace / "leak").is_symlink()


async def test_a_symlink_planted_by_a_command_is_never_followed(run_agent_with, workspace, simulator):
    passwd = Path("/etc/passwd").read_text()
    run = await run_agent_with("anthropic", "fake/agent_symlink_escape")

    assert run.outcome.status == "succeeded"
    [link, read, write, _finish] = run.sink.results()
    assert link == ("run_command", True, "exit 0")
    assert read[:2] == ("read_file", False)
    assert "outside the workspace" in read[2]
    assert write[:2] == ("write_file", False)
    assert "outside the workspace" in write[2]
    assert Path("/etc/passwd").read_text() == passwd
    # Nothing of the host file reached the model.
    assert "root:x:0:0" not in _sent(simulator)


async def test_an_ambiguous_edit_is_refused_with_the_count(run_agent_with, workspace):
    run = await run_agent_with("groq", "fake/agent_edit_non_unique")

    assert run.outcome.status == "succeeded"
    [_write, ambiguous, unique, _finish] = run.sink.results()
    assert ambiguous[:2] == ("edit_file", False)
    assert "occurs 2 times" in ambiguous[2]
    assert unique[:2] == ("edit_file", True)
    assert (workspace / "config.py").read_text() == "DEBUG = True\nVERBOSE = False\n"


async def test_the_same_call_with_the_same_result_is_warned_then_stopped(run_agent_with, simulator):
    run = await run_agent_with("openai", "fake/loop_forever")

    assert (run.outcome.status, run.outcome.error_kind) == ("failed", "stuck")
    assert run.outcome.steps == 4
    requests = simulator.requests()
    assert len(requests) == 4
    # The warning went in after the third identical step, before the fourth model call.
    assert "same tool call with the same result 3 times" in json.dumps(requests[3]["body"]["messages"][-1])
    assert "same tool call" not in json.dumps(requests[2]["body"])


async def test_alternating_between_two_steps_is_stuck(run_agent_with, workspace):
    run = await run_agent_with("anthropic", "fake/agent_ping_pong")

    assert (run.outcome.status, run.outcome.error_kind) == ("failed", "stuck")
    assert run.outcome.steps == 6


async def test_the_step_limit_stops_the_run(run_agent_with):
    run = await run_agent_with("groq", "fake/loop_forever", limits=AgentLimits(max_steps=2))

    assert (run.outcome.status, run.outcome.error_kind) == ("failed", "limit_steps")
    assert run.outcome.steps == 2
    assert run.outcome.error_message == "The agent reached its limit of 2 steps before finishing."


async def test_the_token_limit_stops_the_run_between_steps(run_agent_with):
    # multi_turn_build reports 100 input + 20 output tokens per turn.
    run = await run_agent_with("openai", "fake/multi_turn_build", limits=AgentLimits(max_tokens=150))

    assert (run.outcome.status, run.outcome.error_kind) == ("failed", "limit_tokens")
    assert run.outcome.steps == 2
    assert run.sink.of("turn_started")[1][2:] == (100, 20)


async def test_the_wall_clock_stops_a_stalled_model_call(run_agent_with, simulator):
    run = await run_agent_with("anthropic", "fake/stall", limits=AgentLimits(wall_clock_s=0.5))

    assert (run.outcome.status, run.outcome.error_kind) == ("failed", "limit_time")
    assert run.elapsed_s < 1.5
    # The upstream stream was closed, not left running.
    simulator.wait_for(lambda entry: entry["client_closed"])


async def test_the_wall_clock_bounds_a_running_command(run_agent_with):
    run = await run_agent_with("openai", "fake/agent_sleep", limits=AgentLimits(wall_clock_s=1.0))

    assert (run.outcome.status, run.outcome.error_kind) == ("failed", "limit_time")
    [(name, ok, summary)] = run.sink.results()
    assert (name, ok) == ("run_command", False)
    assert summary.startswith("timed out after")
    assert run.elapsed_s < 3


async def test_consecutive_failing_steps_stop_the_run(run_agent_with):
    run = await run_agent_with("groq", "fake/agent_tool_errors")

    assert (run.outcome.status, run.outcome.error_kind) == ("failed", "tool_errors")
    assert run.outcome.steps == 3
    assert [ok for _name, ok, _summary in run.sink.results()] == [False, False, False, False]


async def test_a_model_that_only_talks_is_nudged_once_then_stopped(run_agent_with, simulator):
    run = await run_agent_with("anthropic", "fake/agent_chatty")

    assert (run.outcome.status, run.outcome.error_kind) == ("failed", "no_progress")
    assert run.outcome.steps == 2
    assert "You did not call a tool" in json.dumps(simulator.requests()[1]["body"]["messages"][-1])


async def test_stop_cancels_a_running_command_within_a_second(run_agent_with):
    stop = asyncio.Event()
    stopped_at: list[float] = []

    def stop_now() -> None:
        stopped_at.append(time.monotonic())
        stop.set()

    async def stop_soon(name: str) -> None:
        if name == "run_command":  # the command is about to start: stop while it runs
            asyncio.get_running_loop().call_later(0.3, stop_now)

    started = time.monotonic()
    run = await run_agent_with("openai", "fake/agent_sleep", stop=stop, sink=RecordingSink(on_tool_call=stop_soon))

    assert (run.outcome.status, run.outcome.error_kind) == ("cancelled", "cancelled")
    assert time.monotonic() - stopped_at[0] < 1.0
    assert time.monotonic() - started < 3
    assert run.sink.results() == [("run_command", False, "cancelled")]


async def test_stop_closes_a_streaming_model_call_within_a_second(run_agent_with, simulator):
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.3, stop.set)

    run = await run_agent_with("groq", "fake/stall", stop=stop)

    assert run.outcome.status == "cancelled"
    assert run.elapsed_s < 1.3
    simulator.wait_for(lambda entry: entry["client_closed"])


async def test_between_steps_can_stop_the_run(run_agent_with):
    answers = iter([None, "token_cap_reached"])

    async def between_steps() -> str | None:
        return next(answers)

    run = await run_agent_with("openai", "fake/loop_forever", between_steps=between_steps)

    assert (run.outcome.status, run.outcome.error_kind) == ("failed", "token_cap_reached")
    assert run.outcome.error_message == "The organization's monthly token cap was reached."
    assert run.outcome.steps == 1
