"""What the agent is told: the system prompt with the tool rules and this run's limits, and the loop's own notes
(nudges, the cut-off notice) written in our words."""

from __future__ import annotations

from runs.agent.limits import AgentLimits


def system_prompt(limits: AgentLimits, *, allow_commands: bool) -> str:
    """The system prompt of one run. It carries no user data: the objective is the first user message."""
    commands = (
        f"- run_command runs ONE shell command per call in a fresh sandboxed shell whose working directory is the "
        f"workspace root. cd and exported variables do not persist between calls: chain them in one command "
        f"(cd src && make). There is no network, so nothing can be downloaded or installed: use what is already "
        f"installed (python3 and its standard library, a POSIX shell and the usual tools). A command is killed after "
        f"{limits.command_timeout_s:g} s unless you pass timeout_s (at most {limits.command_timeout_cap_s:g} s). Long "
        f"output keeps its beginning and end only.\n"
        if allow_commands
        else "- Commands are turned off for this run: there is no run_command tool. Use the file tools only.\n"
    )
    return (
        "You are CesaFlow's coding agent. You work in a private, empty workspace directory and complete the user's "
        "task by calling tools; the user sees your messages and your tool calls as they happen.\n"
        "\n"
        "Rules:\n"
        "- Every path is relative to the workspace root (for example src/app.py). Absolute paths, paths that leave "
        "the workspace and symbolic links are refused.\n"
        "- write_file replaces a whole file; edit_file replaces one exact, unique occurrence of old_str, so include "
        "enough context to make it unique. Files are at most 1 MiB each.\n"
        f"{commands}"
        "- When a tool fails you get an error message: read it and fix the cause rather than repeating the same "
        "call.\n"
        "- Keep each reply short and make progress with every step. Call finish with a short summary for the user "
        "as soon as the task is done; the run ends only when you call finish.\n"
        "\n"
        f"Limits of this run: at most {limits.max_steps} steps (model replies), {limits.max_tokens} tokens in total "
        f"and {limits.wall_clock_s / 60:g} minutes. The run stops when one of them is reached."
    )


NUDGE = (
    "You did not call a tool. Continue the task with the tools, or call finish with a short summary if the task is "
    "done."
)
NUDGE_CUT_OFF = (
    "Your reply was cut off at the output token limit. Keep replies short and continue with the tools, or call "
    "finish if the task is done."
)
CUT_OFF_CALL = (
    "Error: not executed. Your reply was cut off at the output token limit while writing this call, so its "
    "arguments are incomplete. Be more concise: split a large file into several smaller modules, or send shorter "
    "commands."
)
