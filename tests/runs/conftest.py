"""The provider simulator as a fixture: one server per test session (its own thread and event loop, an ephemeral
loopback port), reset before and after every test."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from runs.simulator import SimulatorThread

FAKE_KEY = "fake-key-h4-0123456789"


class SimulatorHandle:
    """What tests use: ``base_urls`` per flavour, ``enqueue()``, ``requests()``, ``reset()``."""

    def __init__(self, thread: SimulatorThread) -> None:
        self._thread = thread

    @property
    def base_urls(self) -> dict[str, str]:
        return self._thread.base_urls

    @property
    def base_url(self) -> str:
        return self._thread.simulator.base_url

    @property
    def port(self) -> int:
        return self._thread.simulator.port

    def enqueue(self, flavour: str, *scenarios: Any) -> None:
        """Queue scenarios (dicts in the §3.4 format, or built-in names) for the next requests of ``flavour``."""
        self._thread.state.enqueue(flavour, scenarios)

    def requests(self) -> list[dict[str, Any]]:
        """The requests received so far (headers with masked keys, parsed bodies, outcome flags)."""
        return self._thread.state.requests()

    def reset(self) -> None:
        self._thread.state.reset()
        self._thread.state.groq_reject_stream_options = False

    def set_groq_reject_stream_options(self, value: bool) -> None:
        self._thread.state.groq_reject_stream_options = value

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 2.0) -> dict[str, Any]:
        """The first logged request matching ``predicate``, polling until ``timeout`` (the server runs in
        another thread, so what it observes, like a client hanging up, lands a moment later)."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.requests():
                if predicate(entry):
                    return entry
            if time.monotonic() > deadline:
                raise AssertionError(f"No simulator request matched within {timeout} s: {self.requests()!r}")
            time.sleep(0.005)


@pytest.fixture(scope="session")
def simulator_server() -> Iterator[SimulatorThread]:
    thread = SimulatorThread(record_requests=True).start()
    yield thread
    thread.stop()


@pytest.fixture
def simulator(simulator_server: SimulatorThread) -> Iterator[SimulatorHandle]:
    handle = SimulatorHandle(simulator_server)
    handle.reset()
    yield handle
    handle.reset()
