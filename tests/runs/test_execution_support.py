"""Helpers shared by the run execution, worker, websocket, SSE and canary tests (this module holds no tests).

Runs are created with ``run_create`` (the real write path). Tests that execute runs themselves set
``settings.RUN_EXECUTOR = "worker"`` first: ``submit`` then only nudges workers (none listen in-process), the run
stays queued, and the test hands it to an :class:`~runs.executor.Executor` running in the test's own event loop,
which keeps timing and teardown deterministic.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import channel_layers, get_channel_layer
from django.db import connections

from keys.models import Provider, ProviderKey
from keys.services import provider_key_create
from runs import events
from runs.executor import Executor, ExecutorConfig
from runs.models import Run, RunStatus
from runs.providers.base import CallLimits
from runs.services import run_create
from tests.runs.conftest import FAKE_KEY


@pytest.fixture
async def async_isolation() -> AsyncIterator[None]:
    """For async tests (modules list it in ``usefixtures``):

    * a fresh channel-layer instance: every test has its own event loop, and channels_redis keeps per-loop state
      (receive locks) in its instance, which a later loop then trips over;
    * asgiref's shared worker thread (where async ORM calls run) closes its database connection afterwards, or
      the test database could not be dropped at the end of the session.
    """
    channel_layers.backends.clear()
    yield
    await sync_to_async(connections.close_all)()
    channel_layers.backends.clear()


# Small timings so failures and retries take milliseconds.
FAST_LIMITS = CallLimits(
    connect_timeout_s=2.0,
    read_timeout_s=2.0,
    deadline_s=20.0,
    max_retries=2,
    backoff_base_s=0.005,
    backoff_max_s=0.02,
)

PROVIDERS = {"openai": Provider.OPENAI, "anthropic": Provider.ANTHROPIC, "groq": Provider.GROQ}


def sim_key(
    org: Any, actor: Any, simulator: Any, *, flavour: str = "openai", secret: str = FAKE_KEY, label: str = "sim"
) -> ProviderKey:
    """A provider key of ``org`` whose base URL is the simulator's ``flavour`` endpoint."""
    return provider_key_create(
        org=org,
        actor=actor,
        provider=PROVIDERS[flavour],
        label=label,
        secret=secret,
        base_url=simulator.base_urls[flavour],
    )


def make_run(
    member: Any, key: ProviderKey, *, model: str = "fake/echo", objective: str = "Say hello.", watch: bool = False
) -> Run:
    """A chat run through the real write path. Unwatched by default: most execution tests hand the run to their
    own executor and watch its channel-layer group directly; start-on-attach tests pass ``watch=True``."""
    return run_create(
        org=key.org, actor=member.user, provider_key_id=key.id, model=model, objective=objective, watch=watch
    )


def make_executor(*, limits: CallLimits = FAST_LIMITS, **overrides: Any) -> Executor:
    config = {"heartbeat_s": 0.2, "stale_after_s": 1.0, "cancel_poll_s": 0.05, "poll_s": 0.2, **overrides}
    claim_queued = config.pop("claim_queued", False)
    reap = config.pop("reap", False)
    return Executor(
        config=ExecutorConfig.from_settings(claim_queued=claim_queued, reap=reap, **config),
        label="test",
        limits=limits,
    )


@asynccontextmanager
async def running_executor(**overrides: Any) -> AsyncIterator[Executor]:
    """An executor in the test's event loop, stopped (runs recorded) when the block ends."""
    executor = make_executor(**overrides)
    executor.start()
    try:
        yield executor
    finally:
        await executor.stop()


class EventWatcher:
    """A channel subscribed to a run's group: sees exactly what a websocket or SSE client would."""

    def __init__(self, run_id: uuid.UUID) -> None:
        self.run_id = run_id
        self.layer = get_channel_layer()
        self.channel = ""
        self.events: list[dict[str, Any]] = []
        self.arrivals: list[float] = []

    async def __aenter__(self) -> EventWatcher:
        self.channel = await self.layer.new_channel()
        await self.layer.group_add(events.run_group(self.run_id), self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.layer.group_discard(events.run_group(self.run_id), self.channel)

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        while True:
            message = await asyncio.wait_for(self.layer.receive(self.channel), timeout)
            if message.get("type") == "run.event":
                self.events.append(message["event"])
                self.arrivals.append(time.monotonic())
                return dict(message["event"])

    async def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = await self.next(max(0.01, deadline - time.monotonic()))
            if predicate(event):
                return event

    async def until_finished(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        await self.until(lambda e: e["type"] == "run.finished", timeout)
        return self.events

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    @property
    def text(self) -> str:
        return "".join(e["text"] for e in self.of_type("text.delta"))


async def execute(executor: Executor, run: Run, timeout: float = 10.0) -> tuple[Run, EventWatcher]:
    """Hand a queued run to ``executor`` and collect its events until it finishes."""
    async with EventWatcher(run.id) as watcher:
        assert await executor.submit_run(run.id)
        await watcher.until_finished(timeout)
    finished = await Run.objects.aget(id=run.id)
    return finished, watcher


async def wait_for_status(run_id: uuid.UUID | str, statuses: Collection[str], timeout: float = 10.0) -> Run:
    deadline = time.monotonic() + timeout
    while True:
        run = await Run.objects.aget(id=run_id)
        if run.status in statuses:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} is {run.status}, expected one of {sorted(statuses)}")
        await asyncio.sleep(0.02)


async def simulator_saw(simulator: Any, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> None:
    """``simulator.wait_for`` without blocking the event loop (the executor under test may run in it)."""
    deadline = time.monotonic() + timeout
    while not any(predicate(entry) for entry in simulator.requests()):
        if time.monotonic() > deadline:
            raise AssertionError(f"No simulator request matched within {timeout} s: {simulator.requests()!r}")
        await asyncio.sleep(0.01)


def wait_for_status_sync(run_id: uuid.UUID, statuses: Collection[str], timeout: float = 10.0) -> Run:
    deadline = time.monotonic() + timeout
    while True:
        run = Run.objects.get(id=run_id)
        if run.status in statuses:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} is {run.status}, expected one of {sorted(statuses)}")
        time.sleep(0.02)


TERMINAL = {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED}

amake_run = sync_to_async(make_run)
asim_key = sync_to_async(sim_key)
