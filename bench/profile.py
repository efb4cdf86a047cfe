"""Where CesaFlow's CPU goes on the gateway's path: a sampling profile of one server process under the sequential
load of the benchmark's first phase (issue #13: "a profile showing where the remaining time goes").

``make bench-profile`` (about two minutes; ``PROFILE_ARGS="--seconds 30 --server uvicorn"`` to change) starts what
``make bench`` starts for CesaFlow alone (a throwaway PostgreSQL cluster, Redis db 10 flushed, the provider
simulator, one server process pinned to its core, production settings with generated secrets), warms it up, then
records it with py-spy while one client sends 10-token streamed completions back to back, kept alive.

py-spy (``PYSPY_REQUIREMENT``) is installed into ``var/bench-pyspy/`` on first use, like LiteLLM
(``bench.toolvenv``), never a project dependency. It reads the process from outside (ptrace: root, or
``CAP_SYS_PTRACE``) and samples only the thread that holds the GIL (``--gil``): Python's CPU, which ``perf`` showed
to be about 85 % of the process's CPU on this path (the rest is the kernel and C libraries). The report groups every
sample under the first category (in ``CATEGORIES`` order) that one of its frames names, and lists the project's own
functions by inclusive share. The raw folded stacks go to ``bench/results/profile-<UTC time>.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import runstream, servers, toolvenv
from bench.client import Connection
from bench.harness import PRIVATE_POSTGRES, harness, pin_self
from bench.measure import Target
from bench.run import API_PATH, CHAT_PATH
from deploy.throwaway import HOST, ROOT

PYSPY_REQUIREMENT = "py-spy==0.4.3"
PYSPY_VENV = ROOT / "var" / "bench-pyspy"
SAMPLES_PER_S = 250
RUN_SCENARIOS = {"run-ws": "ws", "run-sse": "sse"}  # scenario -> bench.runstream transport

# (category, frame substrings): a sample counts under the first category one of its frames matches.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("run row + key.used audit row (one thread hop, ORM)", ("_record_start",)),
    ("run ends + usage rows (written in batches, one thread hop, ORM)", ("runs_finish (",)),
    ("run created (REST API, one thread hop, ORM)", ("run_create (",)),
    ("run attached: snapshot, claim, key.used (one thread hop, ORM)", ("watch_start (",)),
    ("queue looked at after a run ends (one thread hop, ORM)", ("runs_claim_queued (",)),
    ("other database hops (ORM)", ("db_hop.<locals>.whole",)),
    ("database driver, stack cut short (psycopg)", ("psycopg/", "django/db/")),
    ("thread hand-offs (asgiref, thread pool)", ("asgiref/sync.py", "concurrent/futures/")),
    ("run events to the channel layer (Redis)", ("apublish", "channels_redis/")),
    ("authorization generation + rate limit (Redis)", ("ageneration", "ratelimit.py")),
    ("Redis, other", ("redis/",)),
    ("provider call: httpx, adapter, SSE parsing", ("runs/providers/", "httpx/", "httpcore/", "h11/")),
    ("gateway view: key checks, body, frames out", ("runs/api/proxy", "runs/proxy/", "orgs/")),
    ("gateway middleware (headers, request id, logs)", ("middleware", "cesaflow/lib/logs.py")),
    ("Django request and response", ("django/",)),
    ("server (daphne + twisted, or uvicorn)", ("daphne/", "twisted/", "uvicorn/", "autobahn/")),
    ("asyncio event loop", ("asyncio/",)),
)
OUR_PACKAGES = ("cesaflow/", "runs/", "orgs/", "keys/")


def parse_folded(text: str) -> list[tuple[list[str], int]]:
    """py-spy's ``--format raw`` (folded stacks: ``frame;frame;… count``), root first."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def categorize(stacks: list[tuple[list[str], int]]) -> list[tuple[str, float]]:
    """Each category's share of the samples, largest first ("other" last)."""
    total = sum(count for _, count in stacks) or 1
    counts: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        joined = ";".join(frames)
        name = next((name for name, needles in CATEGORIES if any(n in joined for n in needles)), "other")
        counts[name] += count
    other = counts.pop("other", 0)
    return [(name, n / total) for name, n in counts.most_common()] + [("other", other / total)]


def _is_ours(frame: str) -> bool:
    location = frame.rpartition("(")[2]
    return location.startswith(OUR_PACKAGES) and "site-packages" not in location


def our_functions(stacks: list[tuple[list[str], int]], limit: int = 20) -> list[tuple[str, float]]:
    """The project's own functions by inclusive share (each counted once per sample, line numbers dropped)."""
    total = sum(count for _, count in stacks) or 1
    counts: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        names = {frame.rpartition(":")[0] + ")" for frame in frames if _is_ours(frame)}
        for name in names:
            counts[name] += count
    return [(name, n / total) for name, n in counts.most_common(limit)]


async def _sequential(target: Target, *, seconds: float, scenario: str = "fast") -> tuple[int, int]:
    raw = target.api() if scenario == "api" else target.chat(scenario)
    connection = Connection(HOST, target.port)
    done = errors = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            response = await connection.request(raw)
            done += 1
            errors += bool(response.error or response.status != 200)
    finally:
        connection.close()
    return done, errors


async def _run_streams(target: runstream.RunTarget, *, seconds: float, transport: str) -> tuple[int, int]:
    """Runs created and streamed back to back (``bench/runstream.py``), each read to its end."""
    connection = Connection(HOST, target.port)
    samples = runstream.Samples()
    done = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            await runstream.one_run(connection, target, transport, samples)
            done += 1
    finally:
        connection.close()
    return done, samples.errors.count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="how long py-spy records (default 20)")
    parser.add_argument("--server", choices=("daphne", "uvicorn"), default="daphne")
    parser.add_argument(
        "--scenario",
        choices=("fast", "long", "api", *RUN_SCENARIOS),
        default="fast",
        help="fast: 10-token streams (per-request costs, the default); long: 2,000-token ones (per-chunk costs); "
        "api: plain GET /api/v1/org requests; run-ws / run-sse: chat runs created through the REST API and "
        "streamed on the websocket or SSE, executed inline (issue #13, point 4)",
    )
    parser.add_argument("--database-url", default=PRIVATE_POSTGRES)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/10")
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args(argv)
    pin_self(not args.no_pin)
    try:
        py_spy, how = toolvenv.ensure(PYSPY_VENV, PYSPY_REQUIREMENT, "py-spy", timeout_s=300)
    except toolvenv.Unavailable as exc:
        print(f"py-spy unavailable: {exc}", file=sys.stderr)
        return 2
    print(f"py-spy: {PYSPY_REQUIREMENT} in {PYSPY_VENV} ({how})", file=sys.stderr)
    server_bin, _ = servers.installed_or_development(lambda line: print(line, file=sys.stderr))
    with tempfile.TemporaryDirectory(prefix="cesaflow-profile-") as tmp:
        workdir = Path(tmp)
        with harness(
            workdir,
            database_url=args.database_url,
            redis_url=args.redis_url,
            pin=not args.no_pin,
            server_bin=server_bin,
        ) as h:
            h.reset_database()
            h.reset_redis()
            simulator = h.start_simulator()
            url = f"http://{HOST}:{simulator.port}"
            seeded = h.seed_cesaflow(simulator_url=url, tap_url=url)
            server = h.start_server(app="cesaflow", server=args.server, name=f"cesaflow-{args.server}")
            target = Target(
                f"cesaflow-{args.server}", server.port, CHAT_PATH, seeded["api_key"], seeded["label"], api_path=API_PATH
            )
            run_target = runstream.RunTarget("inline", server.port, seeded["api_key"], seeded["provider_key_id"])

            def load(seconds: float, scenario: str) -> tuple[int, int]:
                if scenario in RUN_SCENARIOS:
                    return asyncio.run(_run_streams(run_target, seconds=seconds, transport=RUN_SCENARIOS[scenario]))
                return asyncio.run(_sequential(target, seconds=seconds, scenario=scenario))

            warm, warm_errors = load(3, args.scenario)
            if warm_errors:
                print(f"{warm_errors} of {warm} warm-up requests failed:\n{server.log_tail()}", file=sys.stderr)
                return 1
            raw_path = workdir / "profile.txt"
            record = [str(py_spy), "record", "--pid", str(server.process.pid), "--gil", "--nonblocking"]
            record += ["--rate", str(SAMPLES_PER_S), "--duration", str(round(args.seconds))]
            record += ["--format", "raw", "--output", str(raw_path)]
            spy = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)  # attached before the first measured request
            cpu_before = server.cpu_seconds()
            done, errors = load(args.seconds, args.scenario)
            cpu_s = server.cpu_seconds() - cpu_before
            _, spy_err = spy.communicate(timeout=args.seconds + 60)
            if spy.returncode != 0 or not raw_path.exists():
                print(f"py-spy failed ({spy.returncode}): {spy_err.decode(errors='replace')[-500:]}", file=sys.stderr)
                return 1
            folded = raw_path.read_text()
    stacks = parse_folded(folded)
    samples = sum(count for _, count in stacks)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"profile-{stamp}.txt").write_text(folded)
    unit = "runs" if args.scenario in RUN_SCENARIOS else "requests"
    print(
        f"\n{args.server}, {done} sequential {args.scenario} {unit} in {args.seconds:.0f} s ({errors} failed), "
        f"{cpu_s * 1000 / max(done, 1):.1f} ms of process CPU each; {samples} samples with the GIL held; "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| where (first matching frame) | share of Python CPU |\n|---|---|")
    for name, share in categorize(stacks):
        print(f"| {name} | {share * 100:.1f} % |")
    print("\n| the project's functions (inclusive) | share |\n|---|---|")
    for name, share in our_functions(stacks):
        print(f"| `{name}` | {share * 100:.1f} % |")
    print(f"\nraw folded stacks: bench/results/profile-{stamp}.txt")
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
