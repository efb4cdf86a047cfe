"""The budgets of one agent run (providers.md §2.2 "Limits"): the user pays for every token, so every run is bounded
in model turns, tokens, wall-clock time and command time."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class AgentLimits:
    """Per-run budgets. The defaults are what a run gets unless the org or the request asks for others;
    ``merged`` applies such overrides within the deployment caps (the ``MAX_*`` class constants)."""

    max_steps: int = 40  # model turns
    max_tokens: int = 500_000  # cumulative input + output over all turns
    wall_clock_s: float = 1200.0
    command_timeout_s: float = 60.0  # a command's timeout when the model does not ask for one
    command_timeout_cap_s: float = 300.0  # the most a model may ask for
    max_consecutive_errors: int = 3  # steps in a row whose every tool call failed

    # Deployment caps: no override goes above these, whoever asks.
    MAX_STEPS: ClassVar[int] = 200
    MAX_TOKENS: ClassVar[int] = 5_000_000
    MAX_WALL_CLOCK_S: ClassVar[float] = 7200.0
    MAX_COMMAND_TIMEOUT_S: ClassVar[float] = 1800.0
    MAX_CONSECUTIVE_ERRORS: ClassVar[int] = 20

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check(field.name, getattr(self, field.name))
        if self.command_timeout_s > self.command_timeout_cap_s:
            raise ValueError("command_timeout_s must not exceed command_timeout_cap_s.")

    def merged(self, overrides: Mapping[str, Any]) -> AgentLimits:
        """These limits with ``overrides`` applied. ValueError, naming the field, for an unknown field, a value of
        the wrong type, below the minimum or above the deployment cap. A default timeout above an overridden cap
        is lowered to the cap rather than refused: asking for a lower cap alone is a reasonable request."""
        names = {field.name for field in dataclasses.fields(self)}
        for name in overrides:
            if name not in names:
                raise ValueError(f"Unknown agent limit {str(name)[:50]!r}.")
        changes = dict(overrides)
        if "command_timeout_cap_s" in changes and "command_timeout_s" not in changes:
            _check("command_timeout_cap_s", changes["command_timeout_cap_s"])
            changes["command_timeout_s"] = min(self.command_timeout_s, float(changes["command_timeout_cap_s"]))
        return dataclasses.replace(self, **changes)


_CAPS: dict[str, tuple[type, float]] = {
    "max_steps": (int, AgentLimits.MAX_STEPS),
    "max_tokens": (int, AgentLimits.MAX_TOKENS),
    "wall_clock_s": (float, AgentLimits.MAX_WALL_CLOCK_S),
    "command_timeout_s": (float, AgentLimits.MAX_COMMAND_TIMEOUT_S),
    "command_timeout_cap_s": (float, AgentLimits.MAX_COMMAND_TIMEOUT_S),
    "max_consecutive_errors": (int, AgentLimits.MAX_CONSECUTIVE_ERRORS),
}


def _check(name: str, value: Any) -> None:
    kind, cap = _CAPS[name]
    # bool is an int subclass: True is not a step count.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number.")
    if isinstance(value, int) and abs(value) > 10**15:  # a 400-digit integer would overflow math.isfinite
        raise ValueError(f"{name} must be at most {cap:g}.")
    if kind is int:
        if not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number.")
        if value < 1:
            raise ValueError(f"{name} must be at least 1.")
    elif not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds.")
    if value > cap:
        raise ValueError(f"{name} must be at most {cap:g}.")
