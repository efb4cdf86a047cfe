#!/usr/bin/env python3
"""The deployment drill (issue #15, points 3 and 4): CesaFlow as a multi-process deployment under load, and what
happens to it when a worker, Redis, PostgreSQL or a web process goes away.

    python deploy/drill.py            # bounded: 24 chat + 4 agent runs, short executor timings (about 2 minutes)
    python deploy/drill.py --full     # 200 chat + 20 agent runs, the default timings of the README (about 5 minutes)
    python deploy/drill.py --json out.json --markdown out.md

It starts, on loopback and of its own: PostgreSQL and Redis (throwaway, from the installed binaries; never the
machine's), the provider simulator, two web processes (``python -m cesaflow.serve``, worker executor mode,
production settings with throwaway secrets) and two ``run_worker`` processes; seeds four organizations (admin and
developer, org API key, provider key on the simulator); runs the load through both web processes' REST API, SSE and
websockets (a dashboard session on web A); and, during the load, the four fault drills. Each drill's expected
outcome is written (``Drill.expected``) before it runs, then checked; a table of drill, expected, observed,
pass/fail and timings is printed at the end. Exit status 0 only if every row passed. Everything it started is
stopped when it ends, however it ends (each child dies with it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import psycopg

from deploy.drill_client import (
    TERMINAL,
    Client,
    Org,
    StreamResult,
    Tally,
    ws_connect,
    ws_read,
    ws_watch,
)
from deploy.drill_cluster import Cluster, Timings

WEBS = ("web-a", "web-b")
NONCE_RE = re.compile(r"drill-[0-9a-f]{12}")
LONG_TEXT = ("The drill keeps this answer streaming while processes come and go around it. " * 4)[:240]

SCENARIOS: list[dict[str, object]] = [
    # Load: a short answer, paced so runs overlap.
    {"name": "drill_chat", "turns": [{"text": LONG_TEXT[:96]}], "timing": {"first_token_ms": 50, "per_event_ms": 40},
     "stream_shape": {"text_chunk_chars": 8}},
    # Victims of the drills: streaming for about 9 s, so they are running when something dies.
    {"name": "drill_long", "turns": [{"text": LONG_TEXT}], "timing": {"first_token_ms": 50, "per_event_ms": 150},
     "stream_shape": {"text_chunk_chars": 4}},
    # Streaming for about 1.5 s: started just before PostgreSQL stops, it ends while the database is away.
    {"name": "drill_mid", "turns": [{"text": LONG_TEXT[:120]}], "timing": {"first_token_ms": 20, "per_event_ms": 50},
     "stream_shape": {"text_chunk_chars": 4}},
    # Agent load: the simulator's multi-turn build (write, run the tests, edit, finish).
    {"name": "drill_agent", "base": "multi_turn_build", "timing": {"first_token_ms": 50}},
    # An agent run that sits in a command for a while: its workspace is live when its worker is killed.
    {"name": "drill_agent_long", "turns": [
        {"tool_calls": [{"name": "write_file", "arguments": {"path": "notes.txt", "content": "drill\n"}}]},
        {"tool_calls": [{"name": "run_command", "arguments": {"command": "sleep 6"}}]},
        {"text": "Done.", "tool_calls": [{"name": "finish", "arguments": {"summary": "Slept."}}]},
    ]},
]  # fmt: skip


@dataclass(frozen=True)
class Plan:
    chat_runs: int
    agent_runs: int
    orgs: int
    timings: Timings
    load_seconds: float  # the load is spread over about this long, so it overlaps every drill
    outage_seconds: float  # how long PostgreSQL and Redis stay down
    pool_timeout_s: int | None = None  # CESAFLOW_DB_POOL_TIMEOUT (None: the default, 10 s)

    @classmethod
    def bounded(cls) -> Plan:
        timings = Timings(heartbeat_s=1.0, stale_after_s=3.0, poll_s=1.0, revalidate_s=5)
        return cls(24, 4, 4, timings, load_seconds=40.0, outage_seconds=3.0, pool_timeout_s=3)

    @classmethod
    def full(cls) -> Plan:
        # The README's defaults: heartbeat 10 s, stale after 30 s, poll 2 s, streams re-checked every 30 s.
        return cls(200, 20, 4, Timings(heartbeat_s=10.0, stale_after_s=30.0, poll_s=2.0, revalidate_s=30), 150.0, 6.0)


@dataclass
class Row:
    drill: str
    expected: str
    observed: str = ""
    passed: bool = False
    seconds: float = 0.0
    timings: str = ""


@dataclass
class RunRecord:
    run_id: str
    org: Org
    nonce: str
    kind: str
    source: str  # "load", or the drill that made it
    via: str = ""  # how it was watched
    stream: StreamResult = field(default_factory=StreamResult)
    final_status: str = ""
    reconnects: int = 0  # streams opened again after one broke or was refused


def secs(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


class Drill:
    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.cluster = Cluster(workdir=workdir, timings=plan.timings)
        self.client = Client()
        self.orgs: list[Org] = []
        self.sessions: dict[str, dict[str, str]] = {}  # org id -> session cookies (signed in on web A)
        self.runs: dict[str, RunRecord] = {}
        self.rows: list[Row] = []
        self.worker_pids: dict[int, str] = {}  # pid -> worker name, for the worker identity in the database
        self.create_statuses = Tally()
        self.killed: set[str] = set()  # workers SIGKILLed by a drill
        self.silent_sockets = 0  # websockets that opened but sent nothing (no snapshot, no close) for 20 s

    # --- Setup --------------------------------------------------------------------------------------------------

    def start(self) -> None:
        cluster = self.cluster
        cluster.start_redis()
        cluster.start_postgres()
        cluster.configure()
        if self.plan.pool_timeout_s is not None:
            cluster.env["CESAFLOW_DB_POOL_TIMEOUT"] = str(self.plan.pool_timeout_s)
        cluster.start_simulator(SCENARIOS)
        cluster.manage("migrate", "--noinput")
        self.orgs = [Org(**seeded) for seeded in cluster.seed(self.plan.orgs)]
        for web in WEBS:
            cluster.start_web(web)
        for name in ("worker-a", "worker-b"):
            self.worker_pids[cluster.start_worker(name).pid] = name

    def bases(self) -> list[str]:
        return [self.cluster.base_url(web) for web in WEBS]

    def worker_of(self, worker_id: str) -> str:
        """The drill's name for the process in a run's ``worker_id`` (``worker:<host>:<pid>:<random>``)."""
        parts = worker_id.split(":")
        if len(parts) >= 3 and parts[2].isdigit():
            return self.worker_pids.get(int(parts[2]), worker_id)
        return worker_id or "-"

    async def sign_in_all(self) -> None:
        base = self.cluster.base_url("web-a")
        for org in self.orgs:
            cookies = await self.client.sign_in(base, org)
            if not cookies:
                raise RuntimeError("signing in through the login form failed")
            self.sessions[org.org_id] = cookies

    # --- Database -----------------------------------------------------------------------------------------------

    def db_runs(self) -> dict[str, dict[str, Any]]:
        """Every run with its status, worker and usage rows (the drill's own read, straight from PostgreSQL)."""
        query = (
            "SELECT r.id::text, r.objective, r.kind, r.status, r.error_kind, r.worker_id, r.workspace_state,"
            " (SELECT count(*) FROM runs_usagerecord u WHERE u.run_id = r.id) FROM runs_run r"
        )
        with psycopg.connect(self.cluster.database_url, connect_timeout=5) as conn:
            rows = conn.execute(query).fetchall()
        keys = ("objective", "kind", "status", "error_kind", "worker_id", "workspace_state", "usage_rows")
        return {row[0]: dict(zip(keys, row[1:], strict=True)) for row in rows}

    async def db(self) -> dict[str, dict[str, Any]]:
        return await asyncio.to_thread(self.db_runs)

    async def wait_db(self, ready: Callable[[dict[str, dict[str, Any]]], bool], timeout: float) -> float | None:
        """Poll the database until ``ready``; seconds it took, or None at the deadline."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if ready(await self.db()):
                    return time.monotonic() - started
            except psycopg.Error:
                pass
            await asyncio.sleep(0.25)
        return None

    # --- Runs ---------------------------------------------------------------------------------------------------

    async def create(self, org: Org, body: dict[str, Any], *, web: int, source: str, deadline_s: float = 90) -> str:
        """Create a run through the REST API; on 503 (an outage), 429 (org queue full) or a dead web process, retry
        through the other web process until the deadline. Returns the run id ("" if it never got one)."""
        nonce = f"drill-{uuid.uuid4().hex[:12]}"
        body = {**body, "objective": f"{source} {nonce}"}
        deadline = time.monotonic() + deadline_s
        attempt = 0
        while time.monotonic() < deadline:
            base = self.bases()[(web + attempt) % 2]
            attempt += 1
            try:
                response = await self.client.create_run(base, org, body)
                self.create_statuses.add(str(response.status_code))
            except httpx.HTTPError as exc:
                self.create_statuses.add(type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            if response.status_code == 201:
                run_id = str(response.json()["id"])
                self.runs[run_id] = RunRecord(run_id, org, nonce, str(body.get("kind", "chat")), source)
                return run_id
            if response.status_code not in (429, 503):
                raise RuntimeError(f"creating a run: HTTP {response.status_code} {response.text[:300]}")
            await asyncio.sleep(0.5)
        return ""

    async def watch(self, run_id: str, via: str, *, timeout: float = 60.0) -> RunRecord:
        """Watch a run to its end as a client would: first over ``via`` (``sse-a``, ``sse-b``, or ``ws-a`` with the
        org's dashboard session), and when a stream breaks or is refused (a process killed, an outage), again over
        SSE through either web process, until ``run.finished`` or the deadline; then the REST API as a last word."""
        record = self.runs[run_id]
        record.via = via
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            left = max(1.0, deadline - time.monotonic())
            if attempt == 0:
                base = self.cluster.base_url("web-a" if via.endswith("-a") else "web-b")
            else:
                base = self.bases()[attempt % 2]
            if attempt == 0 and via.startswith("ws"):
                cookies = self.sessions[record.org.org_id]
                # A load run streams for about a second: a socket silent for 20 s is given up, as a client would.
                await ws_watch(base, run_id, cookies, timeout=min(left, 20.0), result=record.stream)
                if record.stream.events == 0 and record.stream.error == "TimeoutError":
                    self.silent_sockets += 1
            else:
                await self.client.sse(base, record.org, run_id, timeout=left, result=record.stream)
            if record.stream.final_status or time.monotonic() >= deadline:
                break
            attempt += 1
            record.reconnects += 1
            await asyncio.sleep(0.5)
        record.final_status = record.stream.final_status or await self.client.status_when_terminal(
            self.bases(), record.org, run_id, time.monotonic() + 60
        )
        return record

    async def one_load_run(self, number: int, kind: str) -> None:
        org = self.orgs[number % len(self.orgs)]
        if kind == "agent":
            run_id = await self.create(org, {"kind": "agent", "model": "fake/drill_agent"}, web=number, source="load")
            if run_id:
                self.runs[run_id].via = "poll"
                self.runs[run_id].final_status = await self.client.status_when_terminal(
                    self.bases(), org, run_id, time.monotonic() + 180
                )
            return
        run_id = await self.create(org, {"model": "fake/drill_chat"}, web=number, source="load")
        if run_id:
            await self.watch(run_id, ("ws-a", "sse-a", "sse-b", "sse-a")[number % 4])

    async def load(self) -> None:
        total = self.plan.chat_runs + self.plan.agent_runs
        every = max(1, total // max(1, self.plan.agent_runs))
        kinds = [
            "agent" if n % every == every - 1 and n // every < self.plan.agent_runs else "chat" for n in range(total)
        ]
        while kinds.count("agent") < self.plan.agent_runs:  # rounding left some out: the last runs are agents
            kinds[len(kinds) - 1 - kinds[::-1].index("chat")] = "agent"
        interval = self.plan.load_seconds / total
        tasks = []
        for number, kind in enumerate(kinds):
            tasks.append(asyncio.create_task(self.one_load_run(number, kind)))
            await asyncio.sleep(interval)
        await asyncio.gather(*tasks)

    async def victims(self, count: int, source: str, *, agents: int = 0) -> list[asyncio.Task[RunRecord | None]]:
        """Long runs for a drill to hurt, watched over SSE through both web processes."""

        async def one(number: int, kind: str) -> RunRecord | None:
            org = self.orgs[number % len(self.orgs)]
            model = "fake/drill_agent_long" if kind == "agent" else "fake/drill_long"
            run_id = await self.create(org, {"kind": kind, "model": model}, web=number, source=source)
            if not run_id:
                return None
            if kind == "agent":
                self.runs[run_id].final_status = await self.client.status_when_terminal(
                    self.bases(), org, run_id, time.monotonic() + 180
                )
                return self.runs[run_id]
            return await self.watch(run_id, ("sse-a", "sse-b")[number % 2], timeout=120)

        kinds = ["agent"] * agents + ["chat"] * count
        return [asyncio.create_task(one(n, kind)) for n, kind in enumerate(kinds)]

    # --- Drills -------------------------------------------------------------------------------------------------

    async def run_drill(self, row: Row, body: Callable[[Row], Awaitable[None]]) -> None:
        print(f"drill: {row.drill}\n  expected: {row.expected}", flush=True)
        started = time.monotonic()
        try:
            await body(row)
        except Exception as exc:
            row.passed = False
            row.observed = f"{row.observed}; drill error {type(exc).__name__}: {exc}".strip("; ")
        row.seconds = time.monotonic() - started
        print(f"  observed: {row.observed}\n  {'PASS' if row.passed else 'FAIL'} ({row.seconds:.1f} s)", flush=True)
        self.rows.append(row)

    async def drill_worker_kill(self, row: Row) -> None:
        def on_a(runs: dict[str, dict[str, Any]]) -> list[str]:
            return [
                run_id
                for run_id, run in runs.items()
                if run["status"] == "running" and self.worker_of(run["worker_id"]) == "worker-a"
            ]

        bound = self.plan.timings.lost_bound_s
        # Worker B is paused (SIGSTOP) while the victims are claimed, so worker A gets them, agent runs included
        # (their workspaces must be cleaned up); B resumes well within stale-after, before anything could reap it.
        pause = min(5.0, self.plan.timings.stale_after_s / 2)
        self.cluster.children["worker-b"].signal(signal.SIGSTOP)
        paused_at = time.monotonic()
        try:
            tasks = await self.victims(6, "worker-kill", agents=2)
            await self.wait_db(
                lambda runs: (
                    sum(1 for r in on_a(runs) if self.runs.get(r) and self.runs[r].source == "worker-kill") >= 8
                ),
                max(0.1, pause - (time.monotonic() - paused_at)),
            )
        finally:
            self.cluster.children["worker-b"].signal(signal.SIGCONT)

        def ready(runs: dict[str, dict[str, Any]]) -> bool:
            hit = on_a(runs)
            live = [r for r in hit if (self.cluster.workspace_root / uuid.UUID(r).hex).exists()]
            return len(hit) >= 2 and any(runs[r]["kind"] == "agent" for r in live)

        # Wait until worker A executes runs, ideally an agent run (its workspace must be cleaned up).
        if await self.wait_db(ready, 20) is None:
            await self.wait_db(lambda runs: bool(on_a(runs)), 10)
        victims = on_a(await self.db())
        workspaces = [self.cluster.workspace_root / uuid.UUID(r).hex for r in victims]
        workspaces = [path for path in workspaces if path.exists()]
        before = await self.db()
        others = [r for r, run in before.items() if run["status"] == "running" and r not in victims]
        self.cluster.kill("worker-a")
        self.killed.add("worker-a")
        killed_at = time.monotonic()

        def lost(runs: dict[str, dict[str, Any]]) -> bool:
            return all(runs[r]["status"] in TERMINAL for r in victims)

        took = await self.wait_db(lost, bound + 20)
        after = await self.db()
        lost_ok = [r for r in victims if after[r]["status"] == "failed" and after[r]["error_kind"] == "worker_lost"]
        gone_deadline = time.monotonic() + bound + 2 * self.plan.timings.heartbeat_s + 10
        while any(path.exists() for path in workspaces) and time.monotonic() < gone_deadline:
            await asyncio.sleep(0.25)
        left = [path.name for path in workspaces if path.exists()]
        cleaned_after = time.monotonic() - killed_at
        self.worker_pids[self.cluster.start_worker("worker-a2").pid] = "worker-a2"  # capacity back for the rest
        results = [record for record in await asyncio.gather(*tasks) if record is not None]
        survivors = [r for r in results if r.run_id not in victims]
        bad_survivors = [r.run_id[:8] for r in survivors if r.final_status != "succeeded"]
        others_final = await self.db()
        others_bad = [r[:8] for r in others if others_final[r]["status"] != "succeeded"]
        lost_watchers = [r for r in results if r.run_id in victims and r.kind == "chat"]
        told = sum(1 for r in lost_watchers if r.stream.final_status == "failed")
        row.passed = (
            len(victims) > 0
            and len(workspaces) > 0
            and took is not None
            and took <= bound + self.plan.timings.poll_s + 2  # the reaper's tick and one database round trip
            and len(lost_ok) == len(victims)
            and not left
            and not bad_survivors
            and not others_bad
        )
        row.observed = (
            f"{len(victims)} runs on worker A at the kill ({sum(1 for r in victims if after[r]['kind'] == 'agent')}"
            f" agent); {len(lost_ok)} failed/worker_lost after {took if took is None else round(took, 1)} s"
            f" (bound {bound:g} s); {len(workspaces)} workspaces, {len(left)} left after {cleaned_after:.1f} s;"
            f" {len(survivors)} other victims and {len(others)} other running runs: "
            f"{len(bad_survivors) + len(others_bad)} not succeeded; {told}/{len(lost_watchers)} SSE watchers of lost "
            "runs told failed"
        )
        row.timings = f"lost after {took if took is None else round(took, 1)} s, workspaces gone {cleaned_after:.1f} s"

    async def drill_web_kill(self, row: Row) -> None:
        org = self.orgs[0]
        cookies = self.sessions[org.org_id]
        ids = [await self.create(org, {"model": "fake/drill_long"}, web=0, source="web-kill") for _ in range(3)]
        ids = [run_id for run_id in ids if run_id]
        base_b = self.cluster.base_url("web-b")
        sockets = [await ws_connect(base_b, run_id, cookies) for run_id in ids]
        first = [StreamResult() for _ in ids]
        reads = [asyncio.create_task(ws_read(s, r, timeout=60)) for s, r in zip(sockets, first, strict=True)]
        deadline = time.monotonic() + 20
        while any(r.text_deltas < 2 for r in first) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        port_b = self.cluster.children["web-b"].port
        self.cluster.kill("web-b")
        killed_at = time.monotonic()
        await asyncio.gather(*reads)
        for socket in sockets:
            await socket.close(timeout=0.5)
        dropped = sum(1 for r in first if r.close_code is not None or r.error)

        async def reconnect(run_id: str) -> tuple[float, str, set[str], StreamResult]:
            status_before = (await self.db())[run_id]["status"]
            socket = await ws_connect(self.cluster.base_url("web-a"), run_id, cookies)
            result = StreamResult()
            reading = asyncio.create_task(ws_read(socket, result, timeout=60))
            while result.events == 0 and not reading.done():
                await asyncio.sleep(0.02)
            reconnected = time.monotonic() - killed_at
            status_after = (await self.db())[run_id]["status"]
            await reading
            await socket.close(timeout=0.5)
            return reconnected, result.first_status, {status_before, status_after}, result

        outcomes = await asyncio.gather(*(reconnect(run_id) for run_id in ids))
        self.cluster.start_web("web-b", port_b)  # back on its address, for the rest of the load
        current = sum(1 for _, snapshot, db_status, _ in outcomes if snapshot in db_status)
        finished = sum(1 for *_, result in outcomes if result.final_status == "succeeded")
        slowest = max((took for took, *_ in outcomes), default=0.0)
        row.passed = bool(ids) and dropped == len(ids) and current == len(ids) and finished == len(ids)
        row.observed = (
            f"{len(ids)} websockets on web B saw text, then {dropped} dropped at the kill; reconnected to web A "
            f"within {slowest:.2f} s; {current}/{len(ids)} snapshots matched the database's status; "
            f"{finished}/{len(ids)} followed to run.finished succeeded"
        )
        row.timings = f"reconnected within {slowest:.2f} s"

    async def drill_postgres_restart(self, row: Row) -> None:
        org = self.orgs[1]
        pool_timeout = float(self.cluster.env.get("CESAFLOW_DB_POOL_TIMEOUT", "10"))
        # Victims that end while the database is away: their end and usage must be recorded once it is back.
        ids = [await self.create(org, {"model": "fake/drill_mid"}, web=n, source="postgres-restart") for n in range(3)]
        ids = [run_id for run_id in ids if run_id]
        watchers = [asyncio.create_task(self.watch(run_id, ("sse-a", "sse-b")[n % 2], timeout=120)) for n, run_id in
                    enumerate(ids)]  # fmt: skip
        deadline = time.monotonic() + 20
        while any(self.runs[r].stream.text_deltas == 0 for r in ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # each is streaming: its key is open, its provider call under way
        api, ready = Tally(), Tally()
        slowest = 0.0
        self.cluster.stop_postgres()
        stopped_at = time.monotonic()
        turn = 0
        while time.monotonic() - stopped_at < self.plan.outage_seconds:
            base = self.bases()[turn % 2]
            turn += 1
            calls = ((api, self.client.list_runs(base, org)), (ready, self.client.http.get(f"{base}/readyz")))
            for tally, call in calls:
                sent = time.monotonic()
                try:
                    tally.add(str((await call).status_code))
                except httpx.HTTPError as exc:
                    tally.add(type(exc).__name__)
                slowest = max(slowest, time.monotonic() - sent)
            await asyncio.sleep(0.2)
        self.cluster.start_postgres_again()
        back_at = time.monotonic()
        recovered: float | None = None
        while time.monotonic() - back_at < 60:
            try:
                answers = [await self.client.list_runs(base, org) for base in self.bases()]
                if all(answer.status_code == 200 for answer in answers):
                    recovered = time.monotonic() - back_at
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
        await asyncio.gather(*watchers)
        calls_served = await self.simulator_calls()
        runs = await self.db()
        victims = [runs[r] for r in ids]
        exact = sum(
            1 for r, run in zip(ids, victims, strict=True) if run["usage_rows"] == calls_served.get(self.runs[r].nonce)
        )
        statuses = ", ".join(run["status"] + (f"/{run['error_kind']}" if run["error_kind"] else "") for run in victims)
        row.passed = (
            set(api.counts) == {"503"}
            and set(ready.counts) == {"503"}
            and slowest <= pool_timeout + 3
            and recovered is not None
            and bool(ids)
            and all(run["status"] in TERMINAL for run in victims)
            and exact == len(ids)
        )
        row.observed = (
            f"during {self.plan.outage_seconds:g} s down: API {api}, /readyz {ready}, slowest answer {slowest:.1f} s "
            f"(pool timeout {pool_timeout:g} s); all 200 again {secs(recovered)} after PostgreSQL was back; "
            f"{len(ids)} runs that ended during the outage: {statuses}, usage rows = calls served for {exact}"
        )
        row.timings = f"503 within {slowest:.1f} s, recovered {secs(recovered)} after restart"

    async def drill_redis_restart(self, row: Row) -> None:
        org = self.orgs[2]
        base_a = self.cluster.base_url("web-a")
        cookies = self.sessions[org.org_id]
        ids = [await self.create(org, {"model": "fake/drill_long"}, web=0, source="redis-restart") for _ in range(2)]
        ids = [run_id for run_id in ids if run_id]
        streams = [StreamResult() for _ in ids]
        sockets = [await ws_connect(base_a, run_id, cookies) for run_id in ids]
        reads = [asyncio.create_task(ws_read(s, r, timeout=120)) for s, r in zip(sockets, streams, strict=True)]
        deadline = time.monotonic() + 20
        while any(r.text_deltas < 1 for r in streams) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        before = {r for r, run in (await self.db()).items() if run["status"] in ("running", "queued")}
        pages = Tally()
        self.cluster.stop_redis()
        stopped_at = time.monotonic()
        turn = 0
        while time.monotonic() - stopped_at < self.plan.outage_seconds:
            try:
                pages.add(str((await self.client.page(self.bases()[turn % 2], "/team/", cookies)).status_code))
            except httpx.HTTPError as exc:
                pages.add(type(exc).__name__)
            turn += 1
            await asyncio.sleep(0.2)
        self.cluster.start_redis_again()
        back_at = time.monotonic()
        old = await self.client.page(base_a, "/team/", cookies)
        signed_out = old.status_code == 302 and "/login" in old.headers.get("location", "")
        fresh: dict[str, str] = {}
        dashboard = 0
        while time.monotonic() - back_at < 20 and dashboard != 200:
            try:
                fresh = await self.client.sign_in(base_a, org)
                dashboard = (await self.client.page(base_a, "/team/", fresh)).status_code if fresh else 0
            except httpx.HTTPError:
                dashboard = 0
            if dashboard != 200:
                await asyncio.sleep(0.5)
        signed_in_after = time.monotonic() - back_at
        if fresh:
            self.sessions[org.org_id] = fresh
        # Streams: each must end (its run's end, or a close) within the re-check interval and some slack.
        stream_deadline = self.plan.timings.revalidate_s + 20
        done, pending = await asyncio.wait(reads, timeout=stream_deadline)
        for task in pending:
            task.cancel()
        for socket in sockets:
            await socket.close(timeout=0.5)
        ends = [
            r.final_status or f"close {r.close_code}" if r.close_code else r.final_status or r.error for r in streams
        ]
        clean = len(done) == len(reads) and all(end for end in ends)
        bound = self.plan.timings.lost_bound_s + 60  # the longest victim, the reaper, and the attach window
        waited = await self.wait_db(lambda runs: all(runs[r]["status"] in TERMINAL for r in before), bound)
        took = None if waited is None else time.monotonic() - back_at
        stuck = (
            []
            if took is not None
            else [r[:8] for r, run in (await self.db()).items() if r in before and run["status"] not in TERMINAL]
        )
        row.passed = set(pages.counts) == {"503"} and signed_out and dashboard == 200 and clean and took is not None
        row.observed = (
            f"dashboard with a session during {self.plan.outage_seconds:g} s down: {pages}; old session after: "
            f"{old.status_code} {'to sign-in' if signed_out else old.headers.get('location', '')}; new sign-in: "
            f"dashboard {dashboard} after {signed_in_after:.1f} s; {len(streams)} open websockets ended: "
            f"{', '.join(ends) or '-'}; {len(before)} runs queued/running at the outage: "
            + (f"all terminal {secs(took)} after Redis was back" if took is not None else f"stuck: {', '.join(stuck)}")
        )
        row.timings = f"sign-in after {signed_in_after:.1f} s, runs terminal after {secs(took)}"

    # --- The load's outcome -------------------------------------------------------------------------------------

    async def simulator_calls(self) -> dict[str, int]:
        """Provider calls the simulator served, per run nonce (the nonce is in the objective the model got)."""
        response = await self.client.http.get(f"{self.cluster.simulator_url}/_fake/requests")
        calls: dict[str, int] = {}
        for entry in response.json()["requests"]:
            if not str(entry.get("path", "")).endswith("/chat/completions"):
                continue
            found = NONCE_RE.search(json.dumps(entry.get("body")))
            if found:
                calls[found.group(0)] = calls.get(found.group(0), 0) + 1
        return calls

    async def check_load(self, row: Row, load_seconds: float) -> None:
        settle = self.plan.timings.lost_bound_s + 60
        took = await self.wait_db(lambda runs: all(run["status"] in TERMINAL for run in runs.values()), settle)
        runs = await self.db()
        calls = await self.simulator_calls()
        by_status: dict[str, int] = {}
        mismatched: list[str] = []
        for run_id, run in runs.items():
            key = f"{run['kind']} {run['status']}" + (f"/{run['error_kind']}" if run["error_kind"] else "")
            by_status[key] = by_status.get(key, 0) + 1
            found = NONCE_RE.search(run["objective"])
            served = calls.get(found.group(0), 0) if found else 0
            missing = served - run["usage_rows"]
            # A run whose worker was SIGKILLed may leave the one call in flight at the kill unrecorded.
            allowed = (0, 1) if self.worker_of(run["worker_id"]) in self.killed else (0,)
            if missing not in allowed:
                mismatched.append(f"{run_id[:8]} ({run['status']}: {served} calls, {run['usage_rows']} rows)")
        not_terminal = [r[:8] for r, run in runs.items() if run["status"] not in TERMINAL]
        watched_on_a = [
            record
            for record in self.runs.values()
            if record.via == "ws-a" and record.stream.text_deltas > 0 and record.run_id in runs
        ]
        from_b = [r for r in watched_on_a if self.worker_of(runs[r.run_id]["worker_id"]) == "worker-b"]
        load = [r for r in self.runs.values() if r.source == "load"]
        unwatched = [
            f"{r.run_id[:8]} ({r.via}, {r.reconnects} reconnects, {r.stream.error or r.stream.close_code or '-'})"
            for r in self.runs.values()
            if r.run_id in runs and runs[r.run_id]["error_kind"] == "not_watched"
        ]
        reconnects = sum(r.reconnects for r in self.runs.values())
        row.passed = (
            took is not None
            and not not_terminal
            and not mismatched
            and bool(from_b)
            and len(load) == self.plan.chat_runs + self.plan.agent_runs
        )
        row.observed = (
            f"{len(load)} load runs + {len(runs) - len(load)} drill runs, all terminal: {not not_terminal}"
            f" ({', '.join(f'{k} {v}' for k, v in sorted(by_status.items()))}); usage rows = provider calls "
            f"served for {len(runs) - len(mismatched)}/{len(runs)} runs ({sum(calls.values())} calls)"
            f"{'; mismatched: ' + ', '.join(mismatched[:5]) if mismatched else ''}; websocket on web A received "
            f"events of {len(from_b)} runs executed by worker B ({len(watched_on_a)} watched there); creates: "
            f"{self.create_statuses}; streams reopened {reconnects} times ({self.silent_sockets} websockets silent)"
            + (f"; not watched in time: {', '.join(unwatched[:5])}" if unwatched else "")
        )
        row.timings = f"load {load_seconds:.0f} s, settled {took if took is None else round(took, 1)} s after"

    # --- The whole drill ----------------------------------------------------------------------------------------

    async def run(self, drills: list[str]) -> list[Row]:
        await self.sign_in_all()
        t = self.plan.timings
        started = time.monotonic()
        load = asyncio.create_task(self.load())
        await asyncio.sleep(min(5.0, self.plan.load_seconds / 8))
        catalogue: dict[str, tuple[str, Callable[[Row], Awaitable[None]]]] = {
            "worker-kill": (
                f"SIGKILL worker A while it executes runs (chat and agent): they become failed/worker_lost within "
                f"stale-after + heartbeat = {t.lost_bound_s:g} s; runs on worker B and other runs end succeeded; "
                "worker A's agent workspaces are deleted",
                self.drill_worker_kill,
            ),
            "web-kill": (
                "SIGKILL web B with open websockets (dashboard session): they drop; the clients reconnect to web A, "
                "get the run's current status first (as in the database) and follow it to run.finished succeeded",
                self.drill_web_kill,
            ),
            "postgres-restart": (
                f"stop PostgreSQL for {self.plan.outage_seconds:g} s under load: every API request and /readyz "
                "answers 503 meanwhile (no 500), within the pool timeout + 3 s; all answer 200 within 60 s of its "
                "return; runs that end during the outage are recorded with exactly their usage",
                self.drill_postgres_restart,
            ),
            "redis-restart": (
                f"kill Redis for {self.plan.outage_seconds:g} s (it restarts empty): a dashboard page with a valid "
                "session is refused 503 meanwhile, never let in; after, the old session is signed out and a new "
                f"sign-in works; open websockets end (run.finished or a close) within {t.revalidate_s + 20} s; no "
                "run stays queued or running",
                self.drill_redis_restart,
            ),
        }
        for name in drills:
            expected, body = catalogue[name]
            await self.run_drill(Row(drill=name, expected=expected), body)
        await load
        load_seconds = time.monotonic() - started
        row = Row(
            drill="load",
            expected=(
                f"{self.plan.chat_runs} chat + {self.plan.agent_runs} agent runs from {self.plan.orgs} orgs through "
                "both web processes (REST, SSE, websockets): every run terminal; per run, one usage row per provider "
                "call the simulator served (a run lost with its worker may miss its call in flight); a websocket on "
                "web A receives events of runs executed by worker B"
            ),
        )
        await self.run_drill(row, lambda r: self.check_load(r, load_seconds))
        return self.rows

    def close(self) -> None:
        self.cluster.close()


def table(rows: list[Row]) -> str:
    lines = ["| drill | expected | observed | result | timings |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [row.drill, row.expected, row.observed, "pass" if row.passed else "**FAIL**", row.timings]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


ALL_DRILLS = ["worker-kill", "web-kill", "postgres-restart", "redis-restart"]


def run_drill(plan: Plan, workdir: Path, drills: list[str]) -> list[Row]:
    """Start everything, run the load and the drills, stop everything; the rows of the table."""
    drill = Drill(plan, workdir)
    try:
        drill.start()
        return asyncio.run(_run(drill, drills))
    finally:
        drill.close()


async def _run(drill: Drill, drills: list[str]) -> list[Row]:
    try:
        return await drill.run(drills)
    finally:
        await drill.client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--full", action="store_true", help="200 chat + 20 agent runs and the README's timings")
    parser.add_argument("--drills", default=",".join(ALL_DRILLS), help=f"comma-separated, of {', '.join(ALL_DRILLS)}")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (process logs) afterwards")
    args = parser.parse_args(argv)
    drills = [name for name in args.drills.split(",") if name]
    unknown = sorted(set(drills) - set(ALL_DRILLS))
    if unknown:
        parser.error(f"unknown drills: {', '.join(unknown)}")
    plan = Plan.full() if args.full else Plan.bounded()
    workdir = Path(tempfile.mkdtemp(prefix="cesaflow-drill-"))
    started = time.monotonic()
    rows: list[Row] = []
    try:
        rows = run_drill(plan, workdir, drills)
    finally:
        passed = bool(rows) and all(row.passed for row in rows)
        if args.keep or not passed:
            print(f"process logs: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(rows))
    verdict = "PASS" if passed else "FAIL"
    print(f"\n{'full' if args.full else 'bounded'} drill: {time.monotonic() - started:.0f} s, {verdict}")
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2))
    if args.markdown:
        args.markdown.write_text(table(rows) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
