"""The coding agent: a model with file and command tools working in one run's workspace (providers.md §2.2).

``run_agent`` is the whole loop; the executor supplies the model calls (``StreamTurn``), the live reporting
(``AgentSink``) and the stop event, and owns the workspace before and after.
"""

from __future__ import annotations

from runs.agent.limits import AgentLimits
from runs.agent.loop import AgentOutcome, AgentSink, BetweenSteps, StreamTurn, run_agent
from runs.agent.tools import TOOLS, tool_specs

__all__ = [
    "TOOLS",
    "AgentLimits",
    "AgentOutcome",
    "AgentSink",
    "BetweenSteps",
    "StreamTurn",
    "run_agent",
    "tool_specs",
]
