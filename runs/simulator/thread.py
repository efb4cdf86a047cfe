"""The simulator in a daemon thread with its own event loop: the pytest fixture and the ``make run`` sidecar."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from runs.simulator.server import ProviderSimulator, SimulatorState


class SimulatorThread:
    """The simulator on its own event loop in a daemon thread (pytest fixture, ``make run`` sidecar)."""

    def __init__(self, **options: Any) -> None:
        self.simulator = ProviderSimulator(**options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def state(self) -> SimulatorState:
        return self.simulator.state

    @property
    def base_urls(self) -> dict[str, str]:
        return self.simulator.base_urls

    def start(self, timeout: float = 10.0) -> SimulatorThread:
        self._thread = threading.Thread(target=self._run, name="provider-simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("The provider simulator did not start in time.")
        if self._error is not None:
            raise RuntimeError("The provider simulator failed to start.") from self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self.simulator.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.simulator.close())
            loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
