"""Scenarios: what one simulated provider request gets back (providers.md §3.4 and §3.6).

A scenario is plain JSON so tests, the control API and ``--script`` files share one format::

    {"name": "write-then-finish",
     "match": {"flavour": "any", "model": null, "endpoint": "chat"},
     "turns": [{"text": "…", "tool_calls": [{"name": "write_file", "arguments": {…}}]}, …],
     "usage": {"input_tokens": "auto", "output_tokens": "auto"},
     "timing": {"first_token_ms": 0, "per_event_ms": 0, "ping_every_ms": 0, "body_end_ms": 0},
     "stream_shape": {"text_chunk_chars": 4, "args_chunk_chars": 12, "split_events": false,
                      "crlf": false, "comments": false, "include_cache_fields": false},
     "fault": null,
     "after_last": "repeat"}

``timing.body_end_ms`` holds the body open that long after the terminal event (a provider slow to end its
response). ``"base": "<built-in name>"`` starts from a built-in and deep-merges the given fields over it, so a test
can say ``{"base": "stall", "fault": {"stall_ms": 200}}``. A tool call gives ``arguments`` (an object, serialised once,
compact) or ``arguments_raw`` (sent verbatim, e.g. invalid JSON), and ``only_if_declared: true`` to emit it only
when the request declares a tool of that name.

Faults (``after_events`` counts SSE events already written):

* ``{"type": "http", "status": 429, "error": "rate_limit", "retry_after_s": 1, "headers": {…}, "body": …}``
* ``{"type": "midstream_error", "after_events": 3, "error": "server" | "overloaded" | "tool_use_failed"}``
* ``{"type": "disconnect", "after_events": 3}`` aborts the TCP connection (no terminating chunk)
* ``{"type": "truncate", "after_events": 3}`` ends the body cleanly with no terminal event
* ``{"type": "stall", "after_events": 2, "stall_ms": 150000}`` goes silent, then carries on
* ``{"type": "stall_with_pings", "after_events": 1, "stall_ms": 600000, "ping_every_ms": 1000}`` keep-alives only
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

FLAVOURS = ("openai", "groq", "anthropic")
FAULT_TYPES = ("http", "midstream_error", "disconnect", "truncate", "stall", "stall_with_pings")
ERROR_PRESETS = (
    "auth",
    "scope",
    "permission",
    "not_found",
    "bad_request",
    "rate_limit",
    "quota",
    "server",
    "overloaded",
    "capacity",
    "tool_use_failed",
)


class ScenarioError(ValueError):
    """A scenario document is malformed; the message says which field."""


@dataclass
class Scenario:
    name: str
    turns: list[dict[str, Any]] = field(default_factory=list)
    echo: bool = False  # the built-in echo turn: "You asked: …" (+ finish, if the request declares it)
    usage: dict[str, Any] = field(default_factory=lambda: {"input_tokens": "auto", "output_tokens": "auto"})
    timing: dict[str, int] = field(default_factory=dict)
    stream_shape: dict[str, Any] = field(default_factory=dict)
    fault: dict[str, Any] | None = None
    match: dict[str, Any] = field(default_factory=dict)
    after_last: str = "repeat"

    def timing_ms(self, key: str) -> int:
        return int(self.timing.get(key, 0))

    def shape(self, key: str, default: Any) -> Any:
        return self.stream_shape.get(key, default)

    def matches(self, *, flavour: str, model: str | None, endpoint: str) -> bool:
        wanted_flavour = self.match.get("flavour") or "any"
        wanted_model = self.match.get("model")
        wanted_endpoint = self.match.get("endpoint") or "chat"
        return (
            wanted_flavour in ("any", flavour)
            and (wanted_model is None or wanted_model == model)
            and wanted_endpoint in ("any", endpoint)
        )

    def turn(self, index: int) -> dict[str, Any]:
        if not self.turns:
            return {}
        if index < len(self.turns):
            return self.turns[index]
        if self.after_last == "finish":
            return {"tool_calls": [{"name": "finish", "arguments": {"summary": "Done."}}]}
        return self.turns[-1]


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _check_turns(turns: Any) -> list[dict[str, Any]]:
    if not isinstance(turns, list):
        raise ScenarioError("'turns' must be a list.")
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ScenarioError(f"turns[{position}] must be an object.")
        if turn.get("text") is not None and not isinstance(turn["text"], str):
            raise ScenarioError(f"turns[{position}].text must be a string.")
        calls = turn.get("tool_calls", [])
        if not isinstance(calls, list):
            raise ScenarioError(f"turns[{position}].tool_calls must be a list.")
        for k, call in enumerate(calls):
            if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
                raise ScenarioError(f"turns[{position}].tool_calls[{k}] needs a name.")
            if "arguments_raw" in call and not isinstance(call["arguments_raw"], str):
                raise ScenarioError(f"turns[{position}].tool_calls[{k}].arguments_raw must be a string.")
        if turn.get("truncate_reason") not in (None, "length"):
            raise ScenarioError(f"turns[{position}].truncate_reason must be 'length' or null.")
    return turns


def _check_fault(fault: Any) -> dict[str, Any] | None:
    if fault is None:
        return None
    if not isinstance(fault, dict) or fault.get("type") not in FAULT_TYPES:
        raise ScenarioError(f"'fault.type' must be one of {', '.join(FAULT_TYPES)}.")
    if fault.get("error") is not None and fault["error"] not in ERROR_PRESETS:
        raise ScenarioError(f"'fault.error' must be one of {', '.join(ERROR_PRESETS)}.")
    for key in ("after_events", "stall_ms", "ping_every_ms", "status"):
        value = fault.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ScenarioError(f"'fault.{key}' must be a non-negative integer.")
    if fault.get("retry_after_s") is not None and not isinstance(fault["retry_after_s"], int | float):
        raise ScenarioError("'fault.retry_after_s' must be a number.")
    if fault.get("headers") is not None and not isinstance(fault["headers"], dict):
        raise ScenarioError("'fault.headers' must be an object.")
    return fault


def parse_scenario(document: Any, *, registry: dict[str, Scenario] | None = None) -> Scenario:
    """A scenario from JSON (or a registered name). Raises ScenarioError with a precise message."""
    registry = BUILTINS if registry is None else registry
    if isinstance(document, str):
        if document not in registry:
            raise ScenarioError(f"Unknown scenario {document!r}.")
        return copy.deepcopy(registry[document])
    if not isinstance(document, dict):
        raise ScenarioError("A scenario must be an object or a scenario name.")
    base_name = document.get("base")
    if base_name is not None:
        if base_name not in registry:
            raise ScenarioError(f"Unknown base scenario {base_name!r}.")
        base = registry[base_name]
        document = _deep_merge(_scenario_dict(base), {k: v for k, v in document.items() if k != "base"})
    name = document.get("name") or base_name or "custom"
    if not isinstance(name, str):
        raise ScenarioError("'name' must be a string.")
    for key in ("usage", "timing", "stream_shape", "match"):
        if document.get(key) is not None and not isinstance(document[key], dict):
            raise ScenarioError(f"'{key}' must be an object.")
    for key, value in (document.get("timing") or {}).items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ScenarioError(f"'timing.{key}' must be a non-negative integer (milliseconds).")
    for key in ("text_chunk_chars", "args_chunk_chars"):
        value = (document.get("stream_shape") or {}).get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ScenarioError(f"'stream_shape.{key}' must be a positive integer.")
    for key, value in (document.get("usage") or {}).items():
        if value != "auto" and (not isinstance(value, int) or value < 0):
            raise ScenarioError(f"'usage.{key}' must be 'auto' or a non-negative integer.")
    if document.get("after_last", "repeat") not in ("repeat", "finish"):
        raise ScenarioError("'after_last' must be 'repeat' or 'finish'.")
    return Scenario(
        name=name,
        turns=_check_turns(document.get("turns", [])),
        echo=bool(document.get("echo", False)),
        usage={"input_tokens": "auto", "output_tokens": "auto", **(document.get("usage") or {})},
        timing=dict(document.get("timing") or {}),
        stream_shape=dict(document.get("stream_shape") or {}),
        fault=_check_fault(document.get("fault")),
        match=dict(document.get("match") or {}),
        after_last=document.get("after_last", "repeat"),
    )


def _scenario_dict(scenario: Scenario) -> dict[str, Any]:
    return {
        "name": scenario.name,
        "turns": scenario.turns,
        "echo": scenario.echo,
        "usage": scenario.usage,
        "timing": scenario.timing,
        "stream_shape": scenario.stream_shape,
        "fault": scenario.fault,
        "match": scenario.match,
        "after_last": scenario.after_last,
    }


def load_script(text: str) -> list[Scenario]:
    """``{"scenarios": [...]}`` from a --script file; every scenario needs a name (it is selected by it)."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ScenarioError(f"The script is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("scenarios"), list):
        raise ScenarioError('A script is an object with a "scenarios" list.')
    scenarios = []
    for position, entry in enumerate(document["scenarios"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ScenarioError(f"scenarios[{position}] needs a name.")
        try:
            scenarios.append(parse_scenario(entry))
        except ScenarioError as exc:
            raise ScenarioError(f"scenarios[{position}] ({entry['name']}): {exc}") from None
    return scenarios


# --- Built-ins (§3.6) ---------------------------------------------------------------------------------------------


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


_FINISH = {"text": "Done.", "tool_calls": [_call("finish", summary="Finished the task.")]}
_TEXT = "Here is a short answer, streamed in small pieces."
_SLOW_TEXT = ("Streaming slowly so that every token can be watched arriving. " * 3)[:160]
_HUGE_TEXT = ("All work and no play makes a very long answer. " * 43_000)[:2_000_000]
_UTF8_TEXT = "Café naïve résumé — ☕ 😀 ✓ 日本語 fin."


def _http(status: int, error: str, **extra: Any) -> dict[str, Any]:
    return {"fault": {"type": "http", "status": status, "error": error, **extra}}


def _text_then(fault: dict[str, Any], text: str = _TEXT) -> dict[str, Any]:
    return {"turns": [{"text": text}], "fault": fault}


# The newcomer's agent demo: a tiny package, its test (stdlib unittest: the sandbox has no network and no pytest),
# the test run, a README, then finish. Small per-event delays let a person watch it stream within about 3 s.
_DEMO_PACKAGE = (
    '"""A tiny greeting package, written by the agent demo."""\n'
    "\n"
    "\n"
    "def greet(name):\n"
    '    """Return a friendly greeting for name."""\n'
    '    return f"Hello, {name}!"\n'
)
_DEMO_TEST = (
    "import unittest\n"
    "\n"
    "from greeting import greet\n"
    "\n"
    "\n"
    "class GreetTest(unittest.TestCase):\n"
    "    def test_greets_by_name(self):\n"
    '        self.assertEqual(greet("Ada"), "Hello, Ada!")\n'
    "\n"
    "    def test_greets_anyone(self):\n"
    '        self.assertEqual(greet("world"), "Hello, world!")\n'
    "\n"
    "\n"
    'if __name__ == "__main__":\n'
    "    unittest.main()\n"
)
_DEMO_COMMAND = "python3 -m unittest discover -s tests -v"
_DEMO_README = (
    "# greeting\n"
    "\n"
    "A tiny Python package: `greet(name)` returns `Hello, <name>!`.\n"
    "\n"
    f"Run the tests with `{_DEMO_COMMAND}`.\n"
)
# A workspace file holding a marker string, to prove file content never reaches a watcher.
AGENT_CANARY_CONTENT = "SECRET-CANARY-7f3a9c: this text must never leave the workspace\n"

_BUILTIN_DOCUMENTS: dict[str, dict[str, Any]] = {
    "echo": {"echo": True},
    "normal": {"echo": True},
    "tool_write": {
        "turns": [
            {
                "text": "I'll create the file.",
                "tool_calls": [_call("write_file", path="main.py", content="print(1)\n")],
            },
            _FINISH,
        ]
    },
    "parallel_tools": {
        "turns": [
            {
                "tool_calls": [
                    _call("write_file", path="app.py", content="def add(a, b):\n    return a + b\n"),
                    _call("write_file", path="test_app.py", content="from app import add\n"),
                ]
            },
            _FINISH,
        ]
    },
    "multi_turn_build": {
        "turns": [
            {"text": "Writing the app.", "tool_calls": [_call("write_file", path="app.py", content="x = 1\n")]},
            {"tool_calls": [_call("run_command", command="python -m pytest -q")]},
            {"tool_calls": [_call("edit_file", path="app.py", old_str="x = 1", new_str="x = 2")]},
            {"text": "All done.", "tool_calls": [_call("finish", summary="Built the app.")]},
        ],
        "usage": {"input_tokens": 100, "output_tokens": 20},
    },
    "bad_tool_args": {
        "turns": [
            {"tool_calls": [{"name": "write_file", "arguments_raw": '{"path": "main.py", "content": '}]},
            {"tool_calls": [_call("write_file", path="main.py", content="print(1)\n")]},
            _FINISH,
        ]
    },
    "unknown_tool": {"turns": [{"tool_calls": [_call("rm_rf", path="/")]}, _FINISH]},
    "path_escape": {
        "turns": [
            {"tool_calls": [_call("write_file", path="../../etc/x", content="owned")]},
            {"tool_calls": [_call("write_file", path="/etc/x", content="owned")]},
            {"tool_calls": [_call("run_command", command="ln -s /etc/passwd leak")]},
            _FINISH,
        ]
    },
    "loop_forever": {"turns": [{"tool_calls": [_call("run_command", command="ls")]}], "after_last": "repeat"},
    "401": _http(401, "auth"),
    "401_scope": _http(401, "scope"),
    "429": _http(429, "rate_limit", retry_after_s=1),
    "429_no_retry_after": _http(429, "rate_limit"),
    "429_quota": _http(429, "quota"),
    "500": _http(500, "server"),
    "529": _http(529, "overloaded"),
    "498": _http(498, "capacity"),
    "x_should_retry_false": _http(500, "server", headers={"x-should-retry": "false"}),
    "midstream_error": _text_then({"type": "midstream_error", "after_events": 3}),
    "midstream_tool_use_failed": _text_then({"type": "midstream_error", "after_events": 3, "error": "tool_use_failed"}),
    "disconnect": _text_then({"type": "disconnect", "after_events": 3}),
    "truncate": _text_then({"type": "truncate", "after_events": 3}),
    "slow": {
        "turns": [{"text": _SLOW_TEXT}],
        "timing": {"first_token_ms": 300, "per_event_ms": 80, "ping_every_ms": 1000},
        "stream_shape": {"text_chunk_chars": 4},
    },
    "stall": _text_then({"type": "stall", "after_events": 2, "stall_ms": 150_000}),
    "stall_with_pings": _text_then(
        {"type": "stall_with_pings", "after_events": 1, "stall_ms": 600_000, "ping_every_ms": 1000}
    ),
    "split_utf8": {
        "turns": [{"text": _UTF8_TEXT}],
        "stream_shape": {"text_chunk_chars": 3, "split_events": True, "crlf": True, "comments": True},
    },
    "huge_output": {"turns": [{"text": _HUGE_TEXT}], "stream_shape": {"text_chunk_chars": 1000}},
    "length_cutoff": {
        "turns": [
            {
                "text": "Writing the module.",
                "tool_calls": [
                    {"name": "write_file", "arguments_raw": '{"path": "big.py", "content": "import os\\nimport sy'}
                ],
                "truncate_reason": "length",
            }
        ]
    },
    # --- Agent loop scenarios (runs/agent) ---
    "agent_demo": {
        "turns": [
            {
                "text": "I'll create a small Python package with a test.",
                "tool_calls": [_call("write_file", path="greeting/__init__.py", content=_DEMO_PACKAGE)],
            },
            {
                "text": "Now a unit test for it.",
                "tool_calls": [_call("write_file", path="tests/test_greeting.py", content=_DEMO_TEST)],
            },
            {"text": "Let me run the tests.", "tool_calls": [_call("run_command", command=_DEMO_COMMAND)]},
            {
                "text": "The tests pass. A short README to finish.",
                "tool_calls": [_call("write_file", path="README.md", content=_DEMO_README)],
            },
            {
                "text": "All done.",
                "tool_calls": [
                    _call(
                        "finish",
                        summary="Created the greeting package with greet(name), a unittest suite that passes, "
                        "and a README.",
                    )
                ],
            },
        ],
        "timing": {"first_token_ms": 100, "per_event_ms": 20},
        "stream_shape": {"text_chunk_chars": 6, "args_chunk_chars": 32},
        "after_last": "finish",
    },
    # A command plants a symlink to a host file; reading and overwriting it through the file tools are refused.
    "agent_symlink_escape": {
        "turns": [
            {"tool_calls": [_call("run_command", command="ln -s /etc/passwd leak")]},
            {"tool_calls": [_call("read_file", path="leak")]},
            {"tool_calls": [_call("write_file", path="leak", content="owned\n")]},
            _FINISH,
        ]
    },
    # edit_file's old_str occurs twice: refused with the count, then a unique one succeeds.
    "agent_edit_non_unique": {
        "turns": [
            {"tool_calls": [_call("write_file", path="config.py", content="DEBUG = False\nVERBOSE = False\n")]},
            {"tool_calls": [_call("edit_file", path="config.py", old_str="False", new_str="True")]},
            {"tool_calls": [_call("edit_file", path="config.py", old_str="DEBUG = False", new_str="DEBUG = True")]},
            _FINISH,
        ]
    },
    # Three steps in a row whose every call fails (different each time, so this is not "stuck").
    "agent_tool_errors": {
        "turns": [
            {"tool_calls": [_call("read_file", path="missing-1.txt")]},
            {"tool_calls": [_call("read_file", path="missing-2.txt"), _call("delete_file", path="missing-3.txt")]},
            {"tool_calls": [_call("edit_file", path="missing-4.txt", old_str="a", new_str="b")]},
            _FINISH,
        ]
    },
    # A,B,A,B,A,B: two calls alternating with the same results.
    "agent_ping_pong": {
        "turns": [
            {"tool_calls": [_call("list_files", path=".")]},
            {"tool_calls": [_call("read_file", path="notes.txt")]},
        ]
        * 4
    },
    # Text only, never a tool call: nudged once, then stopped for no progress.
    "agent_chatty": {"turns": [{"text": "I think the task is quite interesting."}], "after_last": "repeat"},
    # A command that outlives any test: for cancellation and the wall clock.
    "agent_sleep": {
        "turns": [{"text": "Waiting a while.", "tool_calls": [_call("run_command", command="sleep 30")]}, _FINISH]
    },
    # File content with a marker string: watchers must only ever see its size.
    "agent_canary_write": {
        "turns": [{"tool_calls": [_call("write_file", path="secret.txt", content=AGENT_CANARY_CONTENT)]}, _FINISH]
    },
}

BUILTINS: dict[str, Scenario] = {}
for _name, _document in _BUILTIN_DOCUMENTS.items():
    BUILTINS[_name] = parse_scenario({"name": _name, **_document}, registry={})
