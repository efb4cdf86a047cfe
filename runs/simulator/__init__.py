"""A local stand-in for the OpenAI, Groq and Anthropic streaming APIs, for tests and offline demos
(providers.md §3). Loopback only; scenarios pick the behaviour (text, tool calls, faults, timing)."""

from runs.simulator.scenarios import BUILTINS, Scenario, ScenarioError, load_script, parse_scenario
from runs.simulator.server import ProviderSimulator, SimulatorState
from runs.simulator.thread import SimulatorThread

__all__ = [
    "BUILTINS",
    "ProviderSimulator",
    "Scenario",
    "ScenarioError",
    "SimulatorState",
    "SimulatorThread",
    "load_script",
    "parse_scenario",
]
