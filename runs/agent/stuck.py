"""Stuck detection (providers.md §2.1, after OpenHands' StuckDetector): a model that keeps doing the same thing and
getting the same answer burns the user's tokens for nothing.

A step's fingerprint is every call of the step (name, canonical arguments) with its result; call ids are left out
because providers number them afresh each turn. Fingerprints are digests: the detector keeps no conversation text.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Sequence
from enum import Enum

REPEAT_WARNING = 3  # the same step this many times in a row: warn the model
REPEAT_STUCK = 4  # … and this many: stop the run
PATTERN_WINDOW = 6  # A,B,A,B,A,B over the last six steps: stop the run

STUCK_WARNING = (
    "Warning: you have made the same tool call with the same result {count} times in a row. Repeating it will not "
    "change the result: try something different, or call finish if the task is done. The run will be stopped if "
    "this call is repeated again."
)


class Verdict(Enum):
    OK = "ok"
    WARN = "warn"
    STUCK = "stuck"


def canonical_arguments(arguments_json: str) -> str:
    """The arguments in a canonical form, so that whitespace or key order does not hide a repeat."""
    try:
        return json.dumps(json.loads(arguments_json), sort_keys=True, separators=(",", ":"))
    except ValueError:
        return arguments_json


class StuckDetector:
    """Fed one fingerprint per step that made tool calls; says whether to carry on, warn or stop."""

    def __init__(self) -> None:
        self._steps: deque[str] = deque(maxlen=PATTERN_WINDOW)

    def observe(self, calls: Sequence[tuple[str, str, str]]) -> Verdict:
        """Record a step as (name, arguments_json, result) per call, in order, and judge the recent history."""
        digest = hashlib.sha256()
        for name, arguments_json, result in calls:
            for part in (name, canonical_arguments(arguments_json), result):
                digest.update(part.encode("utf-8", "surrogatepass"))
                digest.update(b"\x00")
            digest.update(b"\x01")
        self._steps.append(digest.hexdigest())
        repeats = self.repeats()
        if repeats >= REPEAT_STUCK or self._ping_pong():
            return Verdict.STUCK
        if repeats >= REPEAT_WARNING:
            return Verdict.WARN
        return Verdict.OK

    def repeats(self) -> int:
        """How many of the latest steps in a row are the same as the last one."""
        steps = list(self._steps)
        count = 0
        for step in reversed(steps):
            if step != steps[-1]:
                break
            count += 1
        return count

    def _ping_pong(self) -> bool:
        steps = list(self._steps)
        if len(steps) < PATTERN_WINDOW:
            return False
        a, b = steps[-2], steps[-1]
        return a != b and all(step == (a if i % 2 == 0 else b) for i, step in enumerate(steps))
