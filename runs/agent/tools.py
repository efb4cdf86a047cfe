"""The agent's tools, defined once as neutral JSON Schema (providers.md §2.2); the adapters render them per dialect.

The model's arguments are checked here against the same schemas before anything runs: a model that sends broken
JSON, a missing or extra argument or a wrong type gets a precise error back as an observation, never an exception.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from runs.providers import ToolSpec

# Strings shown to a watcher are cut here: enough to recognise a command or a path, not enough to leak a file.
SUMMARY_MAX_CHARS = 200
FINISH_SUMMARY_MAX_CHARS = 4000

FINISH = "finish"
RUN_COMMAND = "run_command"
# Arguments whose text is file content: a watcher sees their size, never the text.
_CONTENT_ARGUMENTS = {"write_file": ("content",), "edit_file": ("old_str", "new_str")}
_CONTENT_SIZE_KEYS = {"content": "bytes", "old_str": "old_bytes", "new_str": "new_bytes"}


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_PATH = {"type": "string", "description": "A path relative to the workspace root, e.g. src/app.py."}

TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        name="list_files",
        description=(
            "List the files and directories under a path of the workspace as a sorted tree (skips .git, "
            "node_modules and __pycache__; at most 500 entries)."
        ),
        parameters=_object(
            {
                "path": {**_PATH, "description": "A directory relative to the workspace root; default '.'."},
                "max_depth": {"type": "integer", "minimum": 1, "description": "How deep to descend; default 3."},
            }
        ),
    ),
    ToolSpec(
        name="read_file",
        description=(
            "Read a text file with numbered lines, optionally only a range of lines (1-based, inclusive). "
            "Long files are truncated with a note."
        ),
        parameters=_object(
            {
                "path": _PATH,
                "start_line": {"type": "integer", "minimum": 1},
                "end_line": {"type": "integer", "minimum": 1},
            },
            ("path",),
        ),
    ),
    ToolSpec(
        name="write_file",
        description="Create or overwrite a file with the given content; parent directories are created.",
        parameters=_object({"path": _PATH, "content": {"type": "string"}}, ("path", "content")),
    ),
    ToolSpec(
        name="edit_file",
        description=(
            "Replace one exact occurrence of old_str with new_str in a file. old_str must occur exactly once: "
            "include enough surrounding lines to make it unique."
        ),
        parameters=_object(
            {"path": _PATH, "old_str": {"type": "string"}, "new_str": {"type": "string"}},
            ("path", "old_str", "new_str"),
        ),
    ),
    ToolSpec(
        name="delete_file",
        description="Delete a file of the workspace.",
        parameters=_object({"path": _PATH}, ("path",)),
    ),
    ToolSpec(
        name=RUN_COMMAND,
        description=(
            "Run one shell command in a fresh sandboxed shell whose working directory is the workspace root. "
            "cd and exported variables do not persist between calls; there is no network. Returns the exit code "
            "and the output (long output keeps its beginning and end)."
        ),
        parameters=_object(
            {
                "command": {"type": "string"},
                "timeout_s": {"type": "number", "exclusiveMinimum": 0, "description": "Seconds before it is killed."},
            },
            ("command",),
        ),
    ),
    ToolSpec(
        name=FINISH,
        description="Call this once the task is done, with a short summary of what you did for the user.",
        parameters=_object({"summary": {"type": "string"}}, ("summary",)),
    ),
)
TOOLS_BY_NAME: dict[str, ToolSpec] = {tool.name: tool for tool in TOOLS}


def tool_specs(*, allow_commands: bool) -> tuple[ToolSpec, ...]:
    """The tools offered to the model: all of them, or all but ``run_command`` when the org turned commands off."""
    return TOOLS if allow_commands else tuple(t for t in TOOLS if t.name != RUN_COMMAND)


class ArgumentError(ValueError):
    """The model's arguments do not fit the tool; the message is written for the model."""


def parse_arguments(spec: ToolSpec, arguments_json: str) -> dict[str, Any]:
    """The call's arguments as a dict checked against ``spec.parameters`` (the subset of JSON Schema our tools
    use: object, string, integer, number, required, minimum, no extra properties). ArgumentError otherwise."""
    text = arguments_json.strip()
    try:
        # An empty string is how some providers send "no arguments".
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ArgumentError(
            f"The arguments of {spec.name} are not valid JSON ({exc.msg} at character {exc.pos}). Send one JSON "
            "object; if it was cut off, send less at a time."
        ) from None
    if not isinstance(value, dict):
        raise ArgumentError(f"The arguments of {spec.name} must be a JSON object, not {_json_type(value)}.")
    schema = spec.parameters
    properties: Mapping[str, Any] = schema.get("properties", {})
    missing = [name for name in schema.get("required", ()) if name not in value]
    if missing:
        raise ArgumentError(f"{spec.name} is missing required argument(s): {', '.join(missing)}.")
    extra = sorted(name for name in value if name not in properties)
    if extra:
        shown = ", ".join(repr(name[:50]) for name in extra[:5])
        raise ArgumentError(f"{spec.name} has no argument(s) {shown}; it takes: {', '.join(properties)}.")
    checked: dict[str, Any] = {}
    for name, item in value.items():
        checked[name] = _check_value(spec.name, name, properties[name], item)
    return checked


def _check_value(tool: str, name: str, schema: Mapping[str, Any], value: Any) -> Any:
    expected = schema.get("type")
    if expected == "string":
        if not isinstance(value, str):
            raise ArgumentError(f"{tool}: '{name}' must be a string, not {_json_type(value)}.")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") is valid JSON but no path or command
            raise ArgumentError(f"{tool}: '{name}' is not valid UTF-8 text.") from None
        return value
    if expected in ("integer", "number"):
        # bool is an int in Python, never in JSON Schema; 3.0 is an acceptable integer (JSON has one number type).
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ArgumentError(f"{tool}: '{name}' must be a {expected}, not {_json_type(value)}.")
        # JSON integers are unbounded: 1e400 written out in digits would overflow every float computation.
        if isinstance(value, int) and abs(value) > 10**12:
            raise ArgumentError(f"{tool}: '{name}' is out of range.")
        if expected == "integer":
            if isinstance(value, float) and not value.is_integer():
                raise ArgumentError(f"{tool}: '{name}' must be a whole number.")
            value = int(value)
        if "minimum" in schema and value < schema["minimum"]:
            raise ArgumentError(f"{tool}: '{name}' must be at least {schema['minimum']}.")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            raise ArgumentError(f"{tool}: '{name}' must be greater than {schema['exclusiveMinimum']}.")
        return value
    return value  # pragma: no cover - every property of our tools has a type


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def summarise_arguments(name: str, arguments_json: str) -> dict[str, Any]:
    """What a watcher is shown of a call: file content only as a size in bytes, other strings cut to 200 chars,
    nested values as their type. Built from the raw JSON so that a call with invalid arguments shows something too
    (an empty dict when nothing is readable: the raw text may hold file content)."""
    try:
        value = json.loads(arguments_json) if arguments_json.strip() else {}
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    content_keys = _CONTENT_ARGUMENTS.get(name)
    summary: dict[str, Any] = {}
    for key, item in list(value.items())[:10]:
        key = str(key)[:50]
        if content_keys is not None and key in content_keys:
            summary[_CONTENT_SIZE_KEYS[key]] = len(item.encode()) if isinstance(item, str) else None
        elif content_keys is not None and key != "path":
            continue  # an unexpected argument of a file tool could hold the content under another name
        elif isinstance(item, str):
            summary[key] = truncate(item, SUMMARY_MAX_CHARS)
        elif item is None or isinstance(item, bool | int | float):
            summary[key] = item
        else:
            summary[key] = f"<{_json_type(item).split()[-1]}>"
    return summary


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
