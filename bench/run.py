"""CesaFlow's proxy against the bare-Django floor, under daphne and uvicorn: ``make bench`` (or ``--quick``).

Starts the provider simulator, a fresh PostgreSQL database and Redis db for CesaFlow in production mode, the four
proxies (CesaFlow and the floor, each under daphne and under uvicorn, one process each) and measures them
interleaved round by round against the simulator reached directly. Prints a markdown table and writes the raw
samples and figures to ``bench/results/``. Every loop is bounded; the whole run has a hard deadline.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # `python bench/run.py` (what `make bench` runs): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from bench import measure
from bench.client import Connection
from bench.harness import HOST, PRIVATE_POSTGRES, Child, Harness, harness, pin_self
from bench.measure import CpuMeter, Errors, Target, percentile
from bench.report import PROXIES, Figure, markdown_table, save
from bench.tap import Tap

T = TypeVar("T")
CHAT_PATH = "/api/v1/chat/completions"
LOAD_STREAMS = 50
API_PATH = "/api/v1/org"


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to do. Full: 7-10 minutes on 2 cores; quick: about 3 minutes."""

    seq_rounds: int
    seq_requests: int
    load_rounds: int
    load_ramp_s: float
    load_window_s: float
    sat_rounds: int
    sat_concurrency: int
    sat_window_s: float
    long_rounds: int
    api_rounds: int
    api_concurrency: int
    api_window_s: float
    close_trials: int
    capacity_steps: tuple[int, ...]
    capacity_window_s: float
    rss_counts: tuple[int, int]
    deadline_s: float


FULL = Plan(
    seq_rounds=10,
    seq_requests=30,
    load_rounds=3,
    load_ramp_s=1.0,
    load_window_s=5.0,
    sat_rounds=2,
    sat_concurrency=32,
    sat_window_s=3.0,
    long_rounds=5,
    api_rounds=2,
    api_concurrency=16,
    api_window_s=3.0,
    close_trials=15,
    capacity_steps=(50, 75, 100, 125, 150, 200, 300),
    capacity_window_s=2.0,
    rss_counts=(50, 250),
    deadline_s=20 * 60,
)
QUICK = Plan(
    seq_rounds=2,
    seq_requests=25,
    load_rounds=1,
    load_ramp_s=1.0,
    load_window_s=2.0,
    sat_rounds=1,
    sat_concurrency=16,
    sat_window_s=1.5,
    long_rounds=1,
    api_rounds=1,
    api_concurrency=8,
    api_window_s=1.5,
    close_trials=3,
    capacity_steps=(25, 50, 75),
    capacity_window_s=1.0,
    rss_counts=(20, 80),
    deadline_s=6 * 60,
)

STARTED = time.monotonic()


def say(message: str) -> None:
    # The load average is printed because this machine may be shared: a busy neighbour shows up here first.
    load = os.getloadavg()[0]
    print(f"[{time.monotonic() - STARTED:6.1f}s load {load:4.1f}] {message}", file=sys.stderr, flush=True)


def rotated(items: Sequence[T], k: int) -> list[T]:
    """Round k starts with a different target, so no target always runs first (or right after another)."""
    k %= len(items)
    return [*items[k:], *items[:k]]


@dataclass
class Bench:
    plan: Plan
    harness: Harness
    api_key: str = ""
    direct: Target | None = None
    proxies: list[Target] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # proxy -> why it is not measured
    raw: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, dict[str, Figure]] = field(default_factory=dict)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)  # phase -> target -> errors
    floor_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, Child] = field(default_factory=dict)  # target name -> its process (CPU readings)

    def record_errors(self, phase: str, target: Target, errors: Errors) -> None:
        entry = self.errors.setdefault(phase, {}).setdefault(target.name, {"count": 0, "examples": []})
        entry["count"] += errors.count
        entry["examples"] = (entry["examples"] + errors.examples)[:3]

    def put(self, metric: str, target: str, figure: Figure) -> None:
        self.figures.setdefault(metric, {})[target] = figure

    @property
    def everyone(self) -> list[Target]:
        assert self.direct is not None
        return [self.direct, *self.proxies]

    @property
    def streaming(self) -> list[Target]:
        """Targets that stream: the simulator itself first, then every proxy whose endpoint answers."""
        assert self.direct is not None
        return [self.direct, *(t for t in self.proxies if t.name not in self.unavailable)]

    # --- Set-up ---------------------------------------------------------------------------------------------------

    async def start(self, tap: Tap, simulator: Child) -> None:
        h = self.harness
        say("seeding CesaFlow (org, org API key, provider keys on the simulator and on the tap)")
        seeded = h.seed_cesaflow(simulator_url=f"http://{HOST}:{simulator.port}", tap_url=f"http://{HOST}:{tap.port}")
        self.api_key = seeded["api_key"]
        floor_token = secrets.token_urlsafe(32)
        self.floor_env = {
            "BENCH_FLOOR_TOKEN": floor_token,
            "BENCH_FLOOR_UPSTREAMS": json.dumps(
                {
                    "bench": f"http://{HOST}:{simulator.port}/openai/v1",
                    "benchtap": f"http://{HOST}:{tap.port}/openai/v1",
                }
            ),
        }
        self.direct = Target("direct", simulator.port, "/openai/v1/chat/completions", "fake-bench-direct", None)
        self.processes["direct"] = simulator
        for name in PROXIES:
            app, server = name.split("-")
            say(f"starting {name}")
            child = h.start_server(app=app, server=server, name=name, floor_env=self.floor_env)
            self.processes[name] = child
            token = self.api_key if app == "cesaflow" else floor_token
            self.proxies.append(
                Target(name, child.port, CHAT_PATH, token, "bench", tap_label="benchtap", api_path=API_PATH)
            )
        for target in self.proxies:
            await self._probe(target)
        for target in self.everyone:
            errors = await measure.warm_up(target, streams=0 if target.name in self.unavailable else 10)
            self.record_errors("warm_up", target, errors)

    async def _probe(self, target: Target) -> None:
        """A proxy without a working chat endpoint (not built yet, or failing) is reported, not measured."""
        connection = Connection(HOST, target.port)
        response = await connection.request(target.chat("fast"), timeout=30)
        connection.close()
        if response.ok and response.first_content_at is not None:
            return
        if response.status in (404, 405):
            reason = f"no {CHAT_PATH} (HTTP {response.status})"
        else:
            reason = f"chat failed: {response.error or f'HTTP {response.status} {response.body[:200]!r}'}"
        self.unavailable[target.name] = reason
        say(f"{target.name}: {reason}; its streaming figures are skipped")

    # --- Phases ---------------------------------------------------------------------------------------------------

    async def sequential_ttft(self) -> None:
        plan = self.plan
        say(f"sequential TTFT: {plan.seq_rounds} rounds x {plan.seq_requests} requests per target")
        samples: dict[str, list[float]] = {t.name: [] for t in self.streaming}
        cpu = CpuMeter(self.processes)
        for round_no in range(plan.seq_rounds):
            for target in rotated(self.streaming, round_no):
                with cpu.measure(target.name, plan.seq_requests):
                    values, errors = await measure.sequential_ttft(target, plan.seq_requests)
                samples[target.name] += values
                self.record_errors("sequential_ttft", target, errors)
        self.raw["sequential_ttft_s"] = samples
        self._added("seq", samples)
        # CPU time per request does not depend on what else the machine runs: the figure to compare on a busy box.
        for name, per_request in cpu.per_unit().items():
            self.put("cpu_ms_per_stream", name, Figure(per_request * 1000))

    async def load_ttft(self) -> None:
        plan = self.plan
        say(f"TTFT under 50 paced streams: {plan.load_rounds} rounds x {plan.load_window_s:.0f} s per target")
        samples: dict[str, list[float]] = {t.name: [] for t in self.streaming}
        ratios: dict[str, list[float]] = {t.name: [] for t in self.streaming}
        shares: dict[str, list[float]] = {t.name: [] for t in self.streaming}
        for round_no in range(plan.load_rounds):
            for target in rotated(self.streaming, round_no):
                run = await measure.paced_streams(
                    target,
                    streams=LOAD_STREAMS,
                    ramp_s=plan.load_ramp_s,
                    window_s=plan.load_window_s,
                    cpu=self.processes[target.name].cpu_seconds,
                )
                samples[target.name] += run.ttft
                ratios[target.name].append(run.delivered_ratio)
                if run.cpu_share is not None:
                    shares[target.name].append(run.cpu_share)
                self.record_errors("load_ttft", target, run.errors)
        self.raw["load_ttft_s"] = samples
        self.raw["load_delivered_ratio"] = ratios
        self.raw["load_cpu_share"] = shares
        self._added("load", samples)
        # Streams per process if CPU were the only limit: a process at share s of a core for 50 streams runs out
        # of core at 50 / s. An upper bound (latency grows before 100 %), but independent of the harness.
        for target in self.everyone:
            values = shares.get(target.name) or []
            if values and measure.median(values) > 0:
                share = measure.median(values)
                self.put("cpu_share_50_paced", target.name, Figure(share * 100))
                self.put("paced_streams_cpu", target.name, Figure(LOAD_STREAMS / share))
            else:
                self.put("paced_streams_cpu", target.name, self._missing(target))

    def _added(self, prefix: str, samples: dict[str, list[float]]) -> None:
        """Added TTFT = the proxy's percentile minus the simulator's own, both from the same rounds."""
        direct = samples["direct"]
        if not direct:
            return
        for q in (50, 95, 99):
            base = percentile(direct, q)
            self.put(f"{prefix}_direct_ttft_p{q}", "direct", Figure(base * 1000))
            for target in self.proxies:
                values = samples.get(target.name) or []
                figure = Figure((percentile(values, q) - base) * 1000) if values else self._missing(target)
                self.put(f"{prefix}_added_ttft_p{q}", target.name, figure)

    def _missing(self, target: Target) -> Figure:
        return Figure(None, note="not measured" if target.name in self.unavailable else "no samples")

    async def saturation(self) -> None:
        plan = self.plan
        say(f"saturation: {plan.sat_concurrency} clients pulling unpaced 100-token streams")
        runs: dict[str, list[dict[str, float]]] = {t.name: [] for t in self.streaming}
        for round_no in range(plan.sat_rounds):
            for target in rotated(self.streaming, round_no):
                result = await measure.saturation(
                    target, concurrency=plan.sat_concurrency, ramp_s=0.5, window_s=plan.sat_window_s
                )
                runs[target.name].append({"streams_per_s": result.streams_per_s, "events_per_s": result.events_per_s})
                self.record_errors("saturation", target, result.errors)
        self.raw["saturation"] = runs
        for target in self.everyone:
            values = runs.get(target.name) or []
            for metric, key in (
                ("saturation_streams_per_s", "streams_per_s"),
                ("saturation_chunks_per_s", "events_per_s"),
            ):
                figure = Figure(measure.median([v[key] for v in values])) if values else self._missing(target)
                self.put(metric, target.name, figure)

    async def one_stream(self) -> None:
        plan = self.plan
        say(f"one 2,000-token stream: {plan.long_rounds} rounds")
        rates: dict[str, list[float]] = {t.name: [] for t in self.streaming}
        cpu = CpuMeter(self.processes)
        for round_no in range(plan.long_rounds):
            for target in rotated(self.streaming, round_no):
                with cpu.measure(target.name, measure.LONG_STREAM_TOKENS):
                    rate, errors = await measure.one_long_stream(target)
                if rate is not None:
                    rates[target.name].append(rate)
                self.record_errors("one_stream", target, errors)
        self.raw["one_stream_chunks_per_s"] = rates
        for name, per_chunk in cpu.per_unit().items():
            self.put("cpu_us_per_chunk", name, Figure(per_chunk * 1e6))
        for target in self.everyone:
            values = rates.get(target.name) or []
            figure = Figure(measure.median(values)) if values else self._missing(target)
            self.put("one_stream_chunks_per_s", target.name, figure)

    async def api_rps(self) -> None:
        plan = self.plan
        say(f"plain API requests/s: {plan.api_concurrency} clients, {plan.api_rounds} rounds")
        rates: dict[str, list[float]] = {t.name: [] for t in self.proxies}
        cpu = CpuMeter(self.processes)
        for round_no in range(plan.api_rounds):
            for target in rotated(self.proxies, round_no):
                with cpu.measure(target.name) as meter:
                    result = await measure.api_requests(
                        target, concurrency=plan.api_concurrency, window_s=plan.api_window_s
                    )
                    meter.units = result.streams
                rates[target.name].append(result.streams_per_s)
                self.record_errors("api_rps", target, result.errors)
        self.raw["api_rps"] = rates
        for name, per_request in cpu.per_unit().items():
            self.put("cpu_ms_per_api_request", name, Figure(per_request * 1000))
        for target in self.proxies:
            self.put("api_rps", target.name, Figure(measure.median(rates[target.name])))

    async def close_latency(self, tap: Tap) -> None:
        plan = self.plan
        say(f"upstream close after a client disconnect: {plan.close_trials} trials per proxy")
        proxies = [t for t in self.streaming if not t.is_direct]
        samples: dict[str, list[float]] = {t.name: [] for t in proxies}
        misses: dict[str, int] = {t.name: 0 for t in proxies}
        for trial in range(plan.close_trials):
            for target in rotated(proxies, trial):
                latency, errors = await measure.close_latency(target, tap)
                if latency is None:
                    misses[target.name] += 1
                else:
                    samples[target.name].append(latency)
                self.record_errors("close_latency", target, errors)
                await asyncio.sleep(0.1)
        self.raw["close_latency_s"] = samples
        self.raw["close_latency_misses"] = misses
        for target in self.proxies:
            values = samples.get(target.name) or []
            if not values:
                self.put("close_p50_ms", target.name, self._missing(target))
                self.put("close_max_ms", target.name, self._missing(target))
                continue
            self.put("close_p50_ms", target.name, Figure(percentile(values, 50) * 1000))
            if misses[target.name]:
                self.put("close_max_ms", target.name, Figure(3000, prefix="> ", note=f"{misses[target.name]} misses"))
            else:
                self.put("close_max_ms", target.name, Figure(max(values) * 1000))

    async def capacity(self) -> None:
        """Step the number of concurrent paced streams up until each proxy stops keeping pace (or the harness
        itself, measured first at every step, cannot drive that many: then the proxies still in are "≥")."""
        plan = self.plan
        assert self.direct is not None
        say(f"paced stream capacity: steps {plan.capacity_steps}")
        active = [t for t in self.streaming if not t.is_direct]
        steps: dict[str, list[dict[str, float | None]]] = {t.name: [] for t in self.streaming}
        best: dict[str, int] = {}
        harness_limit: int | None = None
        for count in plan.capacity_steps:
            if not active:
                break
            say(f"  {count} streams: direct, {', '.join(t.name for t in active)}")
            baseline: measure.PacedRun | None = None
            for target in [self.direct, *rotated(active, count)]:
                run = await measure.paced_streams(
                    target,
                    streams=count,
                    ramp_s=1.0,
                    window_s=plan.capacity_window_s,
                    cpu=self.processes[target.name].cpu_seconds,
                )
                steps[target.name].append(
                    {
                        "streams": count,
                        "delivered_ratio": run.delivered_ratio,
                        "ttft_p50_ms": percentile(run.ttft, 50) * 1000 if run.ttft else None,
                        "ttft_p99_ms": percentile(run.ttft, 99) * 1000 if run.ttft else None,
                        "errors": run.errors.count,
                        "cpu_share": run.cpu_share,
                    }
                )
                self.record_errors("capacity", target, run.errors)
                if baseline is None:
                    baseline = run
                    if not run.harness_ok:
                        harness_limit = count
                        break
                elif run.keeps_pace_with(baseline):
                    best[target.name] = count
                else:
                    active.remove(target)
            if harness_limit is not None:
                say(f"  the simulator and load generator fell behind at {count} streams: stopping the ladder")
                break
        self.raw["capacity_harness_limit"] = harness_limit
        self.raw["capacity_steps"] = steps
        for target in self.proxies:
            if target.name in self.unavailable:
                self.put("paced_streams_max", target.name, self._missing(target))
                continue
            value = best.get(target.name)
            capped = target in active  # never fell behind: the ladder (or the harness) ran out first
            if value is None:
                self.put("paced_streams_max", target.name, Figure(plan.capacity_steps[0], prefix="< "))
            else:
                self.put("paced_streams_max", target.name, Figure(value, prefix="≥ " if capped else ""))

    async def memory(self) -> None:
        """Fresh processes: RSS idle (after warm-up) and the slope of RSS over open slow streams."""
        plan = self.plan
        low, high = plan.rss_counts
        say(f"memory: fresh process per proxy, {low} then {high} open streams")
        h = self.harness
        details: dict[str, dict[str, float]] = {}
        for existing in self.proxies:
            app, server = existing.name.split("-")
            child = h.start_server(app=app, server=server, name=f"rss-{existing.name}", floor_env=self.floor_env)
            target = Target(existing.name, child.port, CHAT_PATH, existing.token, "bench", api_path=API_PATH)
            await asyncio.sleep(1.0)
            started_kb = child.rss_kb()
            streams_ok = existing.name not in self.unavailable
            self.record_errors("memory", target, await measure.warm_up(target, streams=10 if streams_ok else 0))
            await asyncio.sleep(1.0)
            idle_kb = child.rss_kb()
            entry = {"started_mb": started_kb / 1024, "idle_mb": idle_kb / 1024}
            self.put("rss_idle_mb", target.name, Figure(idle_kb / 1024))
            if not streams_ok:
                self.put("rss_per_stream_kb", target.name, self._missing(target))
            else:
                streams = measure.OpenStreams(target)
                try:
                    await streams.open(low)
                    await asyncio.sleep(1.0)
                    low_kb = child.rss_kb()
                    await streams.open(high - low)
                    await asyncio.sleep(1.0)
                    high_kb = child.rss_kb()
                finally:
                    await streams.close()
                self.record_errors("memory", target, streams.errors)
                per_stream = (high_kb - low_kb) / (high - low)
                entry |= {"low_mb": low_kb / 1024, "high_mb": high_kb / 1024, "per_stream_kb": per_stream}
                entry["per_stream_from_idle_kb"] = (high_kb - idle_kb) / high
                self.put("rss_per_stream_kb", target.name, Figure(per_stream))
            details[target.name] = entry
            h.discard(child)
            await asyncio.sleep(0.5)
        self.raw["memory"] = details


async def main_async(args: argparse.Namespace, plan: Plan, workdir: Path) -> Bench:
    with harness(workdir, database_url=args.database_url, redis_url=args.redis_url, pin=not args.no_pin) as h:
        say(f"fresh database {h.database_url} (drop, create, migrate), Redis {args.redis_url}")
        h.reset_database()
        h.reset_redis()
        say("starting the provider simulator")
        simulator = h.start_simulator()
        tap = Tap(HOST, simulator.port)
        await tap.start()
        bench = Bench(plan=plan, harness=h)
        try:
            await bench.start(tap, simulator)
            phases = args.only or PHASES
            for phase in PHASE_METHODS:
                if phase in phases:
                    bench.raw.setdefault("loadavg_at_start", {})[phase] = os.getloadavg()[0]
                    if phase == "close":
                        await bench.close_latency(tap)
                    else:
                        await getattr(bench, PHASE_METHODS[phase])()
            # Memory needs fresh processes; the long-running ones go first so they use no CPU meanwhile.
            for child in list(h.children):
                if child.name in PROXIES:
                    h.discard(child)
            if "memory" in phases:
                await bench.memory()
        finally:
            await tap.stop()
        return bench


PHASE_METHODS = {
    "seq": "sequential_ttft",
    "load": "load_ttft",
    "saturation": "saturation",
    "long": "one_stream",
    "api": "api_rps",
    "close": "close_latency",
    "capacity": "capacity",
}
PHASES = (*PHASE_METHODS, "memory")


def direct_notes(bench: Bench) -> list[str]:
    """The simulator's own figures: what every "added" figure is relative to, and the harness's ceiling."""
    figures = bench.figures

    def value(metric: str) -> str:
        figure = figures.get(metric, {}).get("direct")
        return "n/a" if figure is None or figure.value is None else f"{figure.value:,.1f}"

    notes = [
        f"- simulator alone: TTFT p50/p99 sequential {value('seq_direct_ttft_p50')}/{value('seq_direct_ttft_p99')} ms, "
        f"under 50 paced streams {value('load_direct_ttft_p50')}/{value('load_direct_ttft_p99')} ms; "
        f"one stream {value('one_stream_chunks_per_s')} chunks/s; saturation {value('saturation_chunks_per_s')} "
        f"chunks/s; CPU with 50 paced streams {value('cpu_share_50_paced')} % of a core",
    ]
    limit = bench.raw.get("capacity_harness_limit")
    if limit is not None:
        notes.append(f"- the harness (simulator + load generator on one core) fell behind at {limit} paced streams")
    return notes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="A few seconds per measurement (smoke run).")
    parser.add_argument(
        "--database-url",
        default=PRIVATE_POSTGRES,
        help="PostgreSQL database for CesaFlow, DROPPED and recreated (its name must contain 'bench'); the "
        "default 'private' starts a throwaway cluster for the run (needs initdb; see bench/README.md).",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/10", help="Redis db for CesaFlow; flushed.")
    parser.add_argument("--no-pin", action="store_true", help="Do not pin the server and the load to separate cores.")
    parser.add_argument("--only", nargs="+", choices=PHASES, help="Run only these phases (debugging).")
    parser.add_argument("--keep-workdir", action="store_true", help="Keep the logs of the processes under test.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    pin_self(not args.no_pin)
    workdir = Path(tempfile.mkdtemp(prefix="cesaflow-bench-"))
    say(f"{'quick' if args.quick else 'full'} run; logs in {workdir}")
    try:
        bench = asyncio.run(asyncio.wait_for(main_async(args, plan, workdir), plan.deadline_s))
    except TimeoutError:
        print(f"The benchmark exceeded its {plan.deadline_s:.0f} s deadline; logs in {workdir}", file=sys.stderr)
        return 1
    table = markdown_table(bench.figures)
    print(table)
    notes = [f"- {name}: {reason}" for name, reason in bench.unavailable.items()]
    notes += direct_notes(bench)
    for phase, by_target in bench.errors.items():
        for name, entry in by_target.items():
            if entry["count"]:
                notes.append(f"- {phase} / {name}: {entry['count']} errors, e.g. {entry['examples'][:1]}")
    if notes:
        print("\nNotes:\n" + "\n".join(notes))
    document = {
        "meta": {
            "mode": "quick" if args.quick else "full",
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "duration_s": round(time.monotonic() - STARTED, 1),
            "cpus": os.cpu_count(),
            "pinned": not args.no_pin,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "plan": asdict(plan),
        },
        "unavailable": bench.unavailable,
        "figures": bench.figures,
        "errors": bench.errors,
        "raw": bench.raw,
        "table": table,
    }
    path = save(document, quick=args.quick)
    say(f"saved {path}")
    if not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
