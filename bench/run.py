"""CesaFlow's proxy against the bare-Django floor and LiteLLM: ``make bench`` (or ``--quick``).

Starts the provider simulator, a fresh PostgreSQL database and Redis db for CesaFlow in production mode, the four
proxies (CesaFlow and the floor, each under daphne and under uvicorn, one process each) and LiteLLM's proxy
(``bench/litellm.py``: its own throwaway venv, left out with a note when it cannot be installed), and measures them
interleaved round by round against the simulator reached directly; then the run stream (``bench/runstream.py``).
Prints two markdown tables and writes the raw samples and figures to ``bench/results/``. Every loop is bounded;
the whole run has a hard deadline. See bench/README.md for what each figure means.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bench import litellm, measure, runstream, servers
from bench.client import Connection
from bench.harness import Harness, harness, pin_self
from bench.measure import CpuMeter, Errors, Target, percentile
from bench.plan import FULL, PHASES, QUICK, STARTED, Plan, parse_args, rotated, say
from bench.report import LITELLM, PROXIES, Figure, markdown_table, missed_report, report_notes, run_stream_table, save
from bench.tap import Tap
from deploy.throwaway import HOST, Child

CHAT_PATH = "/api/v1/chat/completions"
LOAD_STREAMS = 50
API_PATH = "/api/v1/org"


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
    # target name -> starts a fresh process of it under the given child name (the memory figures)
    starters: dict[str, Callable[[str], Child]] = field(default_factory=dict)
    # LiteLLM's installed executable and how it got there, or why it is not available (see main)
    litellm_install: tuple[Path, str] | str = "left out (--no-litellm)"
    litellm_info: dict[str, str] = field(default_factory=dict)
    provider_key_id: str = ""

    def record_errors(self, phase: str, target: Target | str, errors: Errors) -> None:
        name = target if isinstance(target, str) else target.name
        entry = self.errors.setdefault(phase, {}).setdefault(name, {"count": 0, "examples": []})
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
        self.provider_key_id = seeded["provider_key_id"]
        self.processes["direct"] = simulator
        for name in PROXIES:
            app, server = name.split("-")
            say(f"starting {name}")

            def starter(child_name: str, app: str = app, server: str = server) -> Child:
                return h.start_server(app=app, server=server, name=child_name, floor_env=self.floor_env)

            self.starters[name] = starter
            child = self.processes[name] = starter(name)
            token = self.api_key if app == "cesaflow" else floor_token
            self.proxies.append(
                Target(name, child.port, CHAT_PATH, token, "bench", tap_label="benchtap", api_path=API_PATH)
            )
        self._start_litellm(simulator_url=f"http://{HOST}:{simulator.port}", tap_url=f"http://{HOST}:{tap.port}")
        for target in self.proxies:
            await self._probe(target)
        for target in self.everyone:
            errors = await measure.warm_up(target, streams=0 if target.name in self.unavailable else 10)
            self.record_errors("warm_up", target, errors)

    def _start_litellm(self, *, simulator_url: str, tap_url: str) -> None:
        """LiteLLM's proxy from its throwaway venv (installed on first use); left out with the reason if it
        cannot be installed or started."""
        try:
            if isinstance(self.litellm_install, str):
                raise litellm.Unavailable(self.litellm_install)
            setup = litellm.configure(self.harness, self.litellm_install, simulator_url=simulator_url, tap_url=tap_url)
            say(f"starting LiteLLM ({litellm.REQUIREMENT}, {setup.how})")
            child = litellm.start(self.harness, setup)
        except litellm.Unavailable as exc:
            self.unavailable[LITELLM] = str(exc)
            self.litellm_info = {"requirement": litellm.REQUIREMENT, "unavailable": str(exc)}
            say(f"LiteLLM not measured: {exc}")
            return
        self.litellm_info = {"requirement": litellm.REQUIREMENT, "venv": str(litellm.VENV), "install": setup.how}
        self.starters[LITELLM] = lambda child_name: litellm.start(self.harness, setup, name=child_name)
        self.processes[LITELLM] = child
        self.proxies.append(
            Target(LITELLM, child.port, litellm.CHAT_PATH, setup.master_key, "bench", tap_label="benchtap")
        )

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
        to_done: dict[str, list[float]] = {t.name: [] for t in self.streaming}
        cpu = CpuMeter(self.processes)
        for round_no in range(plan.seq_rounds):
            for target in rotated(self.streaming, round_no):
                with cpu.measure(target.name, plan.seq_requests):
                    seq = await measure.sequential(target, plan.seq_requests)
                samples[target.name] += seq.ttft
                to_done[target.name] += seq.to_done
                self.record_errors("sequential_ttft", target, seq.errors)
        self.raw["sequential_ttft_s"] = samples
        self.raw["sequential_to_done_s"] = to_done
        self._added("seq", samples)
        self._added("seq", to_done, what="done")
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

    def _added(self, prefix: str, samples: dict[str, list[float]], what: str = "ttft") -> None:
        """Added TTFT (``what="done"``: added time to the last event) = the proxy's percentile minus the
        simulator's own, both from the same rounds."""
        direct = samples["direct"]
        if not direct:
            return
        for q in (50, 95, 99):
            base = percentile(direct, q)
            self.put(f"{prefix}_direct_{what}_p{q}", "direct", Figure(base * 1000))
            for target in self.proxies:
                values = samples.get(target.name) or []
                figure = Figure((percentile(values, q) - base) * 1000) if values else self._missing(target)
                self.put(f"{prefix}_added_{what}_p{q}", target.name, figure)

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
        targets = [t for t in self.proxies if t.api_path is not None]  # LiteLLM has no such endpoint
        rates: dict[str, list[float]] = {t.name: [] for t in targets}
        cpu = CpuMeter(self.processes)
        for round_no in range(plan.api_rounds):
            for target in rotated(targets, round_no):
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
        for target in targets:
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

    async def run_streams(self) -> None:
        """First ``text.delta`` of runs started through the REST API, on SSE and the websocket (bench/runstream.py):
        the inline executor (in the long-running CesaFlow daphne), then ``run_worker`` behind a fresh daphne."""
        plan = self.plan
        assert self.direct is not None
        h = self.harness
        say(f"run stream: {plan.run_rounds} rounds x {plan.run_samples} runs per transport and executor")
        for executor in runstream.EXECUTORS:
            extra: list[Child] = []
            if executor == "inline":
                port = self.processes["cesaflow-daphne"].port
            else:
                # Inline executors also poll the queue (recovery after a restart) and could claim a worker's run:
                # the long-running CesaFlow processes stop first (the memory phase starts fresh ones anyway).
                for name in PROXIES:
                    if name.startswith("cesaflow-") and name in self.processes:
                        h.discard(self.processes[name])
                worker_env = {"CESAFLOW_EXECUTOR": "worker"}
                server = h.start_server(app="cesaflow", server="daphne", name="runs-daphne", extra_env=worker_env)
                extra = [server, h.start_run_worker(name="runs-worker")]
                port = server.port
            say(f"  {executor} executor")
            target = runstream.RunTarget(executor, port, self.api_key, self.provider_key_id)
            result = await runstream.measure_executor(
                target, self.direct, rounds=plan.run_rounds, samples_per_round=plan.run_samples
            )
            for child in extra:
                h.discard(child)
            for metric, values in runstream.figures(executor, result).items():
                for name, value in values.items():
                    self.put(metric, name, Figure(value))
            raw = self.raw.setdefault("run_stream", {})
            raw[f"direct-{executor}_ttft_s"] = result.direct_ttft
            for transport, samples in result.samples.items():
                raw[f"{executor}-{transport}"] = {
                    "first_event_s": samples.first_event,
                    "first_text_s": samples.first_text,
                    "running_s": samples.running,
                }
                self.record_errors("run_stream", f"{executor}-{transport}", samples.errors)
            self.record_errors("run_stream", f"direct-{executor}", result.direct_errors)
            self.record_errors("run_stream", f"{executor}-warm-up", result.warm_up_errors)

    async def memory(self) -> None:
        """Fresh processes: RSS idle (after warm-up) and the slope of RSS over open slow streams."""
        plan = self.plan
        low, high = plan.rss_counts
        say(f"memory: fresh process per proxy, {low} then {high} open streams")
        h = self.harness
        details: dict[str, dict[str, float]] = {}
        for existing in self.proxies:
            if existing.name not in self.starters:
                continue
            try:
                child = self.starters[existing.name](f"rss-{existing.name}")
            except litellm.Unavailable as exc:  # started once, but not twice: reported, not fatal
                self.record_errors("memory", existing, Errors(1, [str(exc)[:200]]))
                continue
            target = replace(existing, port=child.port)
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


async def main_async(
    args: argparse.Namespace, plan: Plan, workdir: Path, litellm_install: tuple[Path, str] | str, server_bin: Path
) -> Bench:
    with harness(
        workdir, database_url=args.database_url, redis_url=args.redis_url, pin=not args.no_pin, server_bin=server_bin
    ) as h:
        say(f"fresh database {h.database_url} (drop, create, migrate), Redis {args.redis_url}")
        h.reset_database()
        h.reset_redis()
        say("starting the provider simulator")
        simulator = h.start_simulator()
        tap = Tap(HOST, simulator.port)
        await tap.start()
        bench = Bench(plan=plan, harness=h, litellm_install=litellm_install)
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
                if child.name in (*PROXIES, LITELLM):
                    h.discard(child)
            if "memory" in phases:
                bench.raw.setdefault("loadavg_at_start", {})["memory"] = os.getloadavg()[0]
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
    "runs": "run_streams",  # stops the long-running CesaFlow processes: the last phase before memory
}
assert (*PHASE_METHODS, "memory") == PHASES


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, description=__doc__.split("\n\n")[0] if __doc__ else None)
    plan = QUICK if args.quick else FULL
    pin_self(not args.no_pin)
    workdir = Path(tempfile.mkdtemp(prefix="cesaflow-bench-"))
    say(f"{'quick' if args.quick else 'full'} run; logs in {workdir}")
    server_bin, servers_info = servers.installed_or_development(say)
    litellm_install: tuple[Path, str] | str = "left out (--no-litellm)"
    if not args.no_litellm:
        # Before the run's deadline starts: a first install takes a minute or more (bounded at 10).
        say(f"LiteLLM {litellm.REQUIREMENT} in {litellm.VENV} (installed on first use)")
        try:
            litellm_install = litellm.ensure_installed()
        except litellm.Unavailable as exc:
            litellm_install = str(exc)
    try:
        run = main_async(args, plan, workdir, litellm_install, server_bin)
        bench = asyncio.run(asyncio.wait_for(run, plan.deadline_s))
    except TimeoutError:
        print(f"The benchmark exceeded its {plan.deadline_s:.0f} s deadline; logs in {workdir}", file=sys.stderr)
        return 1
    table = markdown_table(bench.figures, unavailable=bench.unavailable)
    print(table)
    runs_table = run_stream_table(bench.figures) if "run_stream" in bench.raw else ""
    if runs_table:
        print("\n" + runs_table)
    missed, missed_text = missed_report(bench.figures, run_stream=bool(runs_table))
    print("\n" + missed_text)
    notes = report_notes(
        bench.figures, unavailable=bench.unavailable, litellm=bench.litellm_info, raw=bench.raw, errors=bench.errors
    )
    notes.append(servers.note(servers_info))
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
            "litellm": bench.litellm_info,
            "servers": servers_info,
        },
        "unavailable": bench.unavailable,
        "figures": bench.figures,
        "errors": bench.errors,
        "raw": bench.raw,
        "table": table,
        "run_stream_table": runs_table,
        "missed": missed,
    }
    path = save(document, quick=args.quick)
    say(f"saved {path}")
    if not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
