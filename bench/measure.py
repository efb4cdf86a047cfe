"""The measurements. Each one is a bounded loop against one target and returns raw samples; ``run.py``
interleaves targets round by round and ``report.py`` turns samples into figures.

Times are ``time.perf_counter()`` seconds; TTFT is request written -> first SSE event carrying non-empty text.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from bench.client import Connection, Response, build_request, chat_body
from bench.harness import PACED_EVENT_MS, SCENARIOS
from bench.tap import Tap
from deploy.throwaway import HOST, Child

PACED_TOKENS_PER_S = 1000 / PACED_EVENT_MS


@dataclass(frozen=True)
class Target:
    """Something to send chat requests to: the simulator itself (``direct``) or a proxy in front of it."""

    name: str
    port: int
    chat_path: str
    token: str
    label: str | None  # the proxy's provider key label ("bench"); None for the simulator itself
    tap_label: str | None = None  # label whose provider base URL goes through the tap
    api_path: str | None = None  # a plain authenticated JSON endpoint

    @property
    def is_direct(self) -> bool:
        return self.label is None

    def chat(self, scenario: str, *, via_tap: bool = False) -> bytes:
        model = f"fake/{SCENARIOS[scenario]['name']}"
        label = self.tap_label if via_tap else self.label
        if label is not None:
            model = f"{label}/{model}"
        return build_request("POST", HOST, self.port, self.chat_path, token=self.token, body=chat_body(model))

    def api(self) -> bytes:
        assert self.api_path is not None
        return build_request("GET", HOST, self.port, self.api_path, token=self.token)


@dataclass
class Errors:
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, response: Response) -> None:
        self.count += 1
        if len(self.examples) < 3:
            detail = response.error or f"HTTP {response.status}: {response.body[:160]!r}"
            self.examples.append(detail)

    def note(self, message: str) -> None:
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(message[:200])

    def check(self, response: Response, *, content_expected: bool = True) -> bool:
        if not response.ok or (content_expected and response.first_content_at is None):
            self.add(response)
            return False
        return True


async def warm_up(target: Target, *, streams: int = 10, api_requests: int = 10) -> Errors:
    """Imports, connection pools and the DB connection warm before anything is measured."""
    errors = Errors()
    connection = Connection(HOST, target.port)
    for _ in range(streams):
        errors.check(await connection.request(target.chat("fast"), timeout=30))
    if target.api_path is not None:
        for _ in range(api_requests):
            errors.check(await connection.request(target.api(), timeout=30), content_expected=False)
    connection.close()
    return errors


# --- Time to first token ----------------------------------------------------------------------------------------


@dataclass
class Sequential:
    """Sequential streams: time to the first words and to the last event (``[DONE]``) of each."""

    ttft: list[float] = field(default_factory=list)
    to_done: list[float] = field(default_factory=list)
    errors: Errors = field(default_factory=Errors)


async def sequential(target: Target, requests: int) -> Sequential:
    """One client, one kept-alive connection, short unpaced answers back to back."""
    result = Sequential()
    connection = Connection(HOST, target.port)
    raw = target.chat("fast")
    for _ in range(requests):
        response = await connection.request(raw, timeout=10)
        if result.errors.check(response) and response.ttft is not None:
            result.ttft.append(response.ttft)
            if response.last_event_at is not None:
                result.to_done.append(response.last_event_at - response.sent_at)
    connection.close()
    return result


@dataclass
class PacedRun:
    streams: int
    window_s: float
    cpu_s: float | None = None  # CPU the target's process used inside the window
    ttft: list[float] = field(default_factory=list)  # streams started inside the window
    content_events_in_window: int = 0
    completed: int = 0
    errors: Errors = field(default_factory=Errors)

    @property
    def tokens_per_s(self) -> float:
        return self.content_events_in_window / self.window_s

    @property
    def delivered_ratio(self) -> float:
        """Delivered tokens / what ``streams`` streams at 50 tokens/s would deliver (1.0 = keeping pace)."""
        return self.tokens_per_s / (self.streams * PACED_TOKENS_PER_S)

    @property
    def cpu_share(self) -> float | None:
        """Fraction of one core the target's process used while serving the streams."""
        return None if self.cpu_s is None else self.cpu_s / self.window_s

    def keeps_pace_with(self, direct: PacedRun) -> bool:
        """Error-free and within 10 % of the tokens the simulator alone delivers to the same number of clients.

        Relative, because even the simulator alone delivers a little under 50 tokens/s per client (timer slack,
        the gap between one answer and the next request); a proxy that falls behind its event loop delivers
        visibly less and starts new streams late.
        """
        return self.errors.count == 0 and self.delivered_ratio >= KEEP_PACE * direct.delivered_ratio

    @property
    def harness_ok(self) -> bool:
        """For the simulator reached directly: the harness itself still keeps up at this many streams."""
        return self.errors.count == 0 and self.delivered_ratio >= HARNESS_PACE


KEEP_PACE = 0.9
# Below this even the simulator + load generator (one shared core) cannot drive the streams: stop the ladder.
HARNESS_PACE = 0.75


async def paced_streams(
    target: Target, *, streams: int, ramp_s: float, window_s: float, cpu: Callable[[], float] | None = None
) -> PacedRun:
    """``streams`` concurrent 50-tokens/s streams, each client restarting as soon as its answer ends.

    Starts are spread over ``ramp_s`` so the streams are out of phase, as real ones are. Measured: TTFT of every
    stream started inside the window and the tokens delivered inside it. After the window no new stream starts;
    the ones running finish normally (no disconnect storm). ``cpu`` reads the target's CPU seconds (window only).
    """
    run = PacedRun(streams=streams, window_s=window_s)
    raw = target.chat("paced")
    start = time.perf_counter()
    window_start = start + ramp_s
    window_end = window_start + window_s

    async def client(index: int) -> None:
        await asyncio.sleep(ramp_s * index / streams)
        connection = Connection(HOST, target.port)
        while time.perf_counter() < window_end:
            response = await connection.request(raw, timeout=30, record_content_times=True)
            if not run.errors.check(response):
                await asyncio.sleep(0.05)  # a failing target must not turn into a busy loop
                continue
            run.completed += 1
            if window_start <= response.sent_at < window_end and response.ttft is not None:
                run.ttft.append(response.ttft)
            run.content_events_in_window += sum(1 for t in response.content_times if window_start <= t < window_end)
        connection.close()

    async def sample_cpu(probe: Callable[[], float]) -> None:
        await asyncio.sleep(window_start - time.perf_counter())
        before = probe()
        await asyncio.sleep(window_end - time.perf_counter())
        run.cpu_s = probe() - before

    tasks = [client(i) for i in range(streams)]
    if cpu is not None:
        tasks.append(sample_cpu(cpu))
    await asyncio.gather(*tasks)
    return run


# --- Throughput -------------------------------------------------------------------------------------------------


@dataclass
class Throughput:
    window_s: float
    streams: int = 0
    events: int = 0
    errors: Errors = field(default_factory=Errors)

    @property
    def streams_per_s(self) -> float:
        return self.streams / self.window_s

    @property
    def events_per_s(self) -> float:
        return self.events / self.window_s


async def saturation(target: Target, *, concurrency: int, ramp_s: float, window_s: float) -> Throughput:
    """As many unpaced 100-token streams as ``concurrency`` clients can pull: streams/s and SSE events/s."""
    result = Throughput(window_s=window_s)
    raw = target.chat("burst")
    start = time.perf_counter()
    window_start, window_end = start + ramp_s, start + ramp_s + window_s

    async def client() -> None:
        connection = Connection(HOST, target.port)
        while time.perf_counter() < window_end:
            response = await connection.request(raw, timeout=30)
            if not result.errors.check(response):
                await asyncio.sleep(0.05)
                continue
            done = response.last_event_at or 0.0
            if window_start <= done < window_end:
                result.streams += 1
                result.events += response.events
        connection.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return result


LONG_STREAM_TOKENS = 2000


async def one_long_stream(target: Target) -> tuple[float | None, Errors]:
    """Tokens/s of one 2,000-token unpaced stream, first token to last (setup time excluded)."""
    errors = Errors()
    connection = Connection(HOST, target.port)
    response = await connection.request(target.chat("long"), timeout=60, record_content_times=True)
    connection.close()
    if not errors.check(response) or len(response.content_times) < 2:
        return None, errors
    elapsed = response.content_times[-1] - response.content_times[0]
    return (len(response.content_times) - 1) / elapsed, errors


async def api_requests(target: Target, *, concurrency: int, window_s: float) -> Throughput:
    """Plain authenticated JSON requests (CesaFlow: ``GET /api/v1/org``) from kept-alive connections."""
    result = Throughput(window_s=window_s)
    raw = target.api()
    deadline = time.perf_counter() + window_s

    async def client() -> None:
        connection = Connection(HOST, target.port)
        while time.perf_counter() < deadline:
            response = await connection.request(raw, timeout=30)
            if result.errors.check(response, content_expected=False):
                result.streams += 1
            else:
                await asyncio.sleep(0.05)
        connection.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return result


# --- Disconnects ------------------------------------------------------------------------------------------------


async def close_latency(target: Target, tap: Tap, *, timeout_s: float = 3.0) -> tuple[float | None, Errors]:
    """Client hangs up mid-stream; seconds until the proxy's upstream connection closes (None: not in time)."""
    errors = Errors()
    tap.forget_closed()
    connection = Connection(HOST, target.port)
    response = await connection.request(target.chat("paced_long", via_tap=True), timeout=10, stop_after_content=3)
    if not errors.check(response):
        connection.close()
        return None, errors
    hung_up_at = time.perf_counter()
    connection.close()
    closed_at = await tap.wait_for_close(since=hung_up_at, timeout=timeout_s)
    if closed_at is None:
        errors.count += 1
        errors.examples.append(f"upstream still open {timeout_s:.0f} s after the client hung up")
        return None, errors
    return closed_at - hung_up_at, errors


# --- Memory -----------------------------------------------------------------------------------------------------


class OpenStreams:
    """Holds N slow streams open (each has delivered its first token) until ``close()``."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.connections: list[Connection] = []
        self.tasks: list[asyncio.Task[Response]] = []
        self.errors = Errors()

    async def open(self, count: int, *, batch: int = 50, timeout_s: float = 30.0) -> None:
        raw = self.target.chat("hold")
        for first in range(0, count, batch):
            ready: list[asyncio.Future[None]] = []
            for _ in range(min(batch, count - first)):
                connection = Connection(HOST, self.target.port)
                started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                ready.append(started)
                self.connections.append(connection)

                def mark(started: asyncio.Future[None] = started) -> None:
                    if not started.done():
                        started.set_result(None)

                self.tasks.append(asyncio.create_task(connection.request(raw, timeout=120, on_first_content=mark)))
            _, pending = await asyncio.wait(ready, timeout=timeout_s)
            if pending:
                self.errors.count += len(pending)
                self.errors.examples.append(f"{len(pending)} streams had no first token within {timeout_s:.0f} s")

    async def close(self) -> None:
        for connection in self.connections:
            connection.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.connections.clear()
        self.tasks.clear()


# --- Statistics -------------------------------------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolation percentile (q in 0..100), like numpy's default."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(samples: list[float]) -> float:
    return statistics.median(samples)


@dataclass
class _Reading:
    units: int


class CpuMeter:
    """CPU seconds a target's process spends per unit of work (request, chunk), summed over rounds."""

    def __init__(self, processes: dict[str, Child]) -> None:
        self.processes = processes
        self.seconds: dict[str, float] = {}
        self.units: dict[str, int] = {}

    @contextlib.contextmanager
    def measure(self, name: str, units: int = 0) -> Iterator[_Reading]:
        reading = _Reading(units)
        before = self.processes[name].cpu_seconds()
        yield reading
        self.seconds[name] = self.seconds.get(name, 0.0) + self.processes[name].cpu_seconds() - before
        self.units[name] = self.units.get(name, 0) + reading.units

    def per_unit(self) -> dict[str, float]:
        return {name: self.seconds[name] / units for name, units in self.units.items() if units}
