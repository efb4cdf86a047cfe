"""The deployment drill's core (``deploy/drill.py`` runs it): the plan, the scenarios the simulator serves, and the
:class:`Drill` that owns the processes, the clients, the runs it made and the rows of its table."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.wsclient import WebSocket
from deploy.drill_client import Client, Org, StreamResult, Tally, ws_connect, ws_watch
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
        self.client = Client(self.cluster.client_tls)
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
        cluster.start_proxy(list(WEBS))
        print(f"drill clients: {cluster.proxy_note}", flush=True)
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

    async def ws_connect(self, base: str, run_id: str, cookies: dict[str, str]) -> WebSocket:
        """A run's websocket at ``base`` (the proxy's, or a web process's own address), as a browser on the site."""
        return await ws_connect(base, run_id, cookies, origin=self.cluster.origin(), tls=self.cluster.client_tls)

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
        """Create a run through the REST API; on 503 (an outage), 429 (org queue full), 502 (the proxy's answer when
        the POST met a stopped web process: Caddy cannot replay a body) or a dead web process, retry (through the
        other web process when there is no proxy) until the deadline. Returns the run id ("" if it never got one)."""
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
            if response.status_code not in (429, 502, 503):
                raise RuntimeError(f"creating a run: HTTP {response.status_code} {response.text[:300]}")
            await asyncio.sleep(0.5)
        return ""

    async def watch(self, run_id: str, via: str, *, timeout: float = 60.0) -> RunRecord:
        """Watch a run to its end as a client would: first over ``via`` (``sse-a``, ``sse-b``: SSE through the proxy,
        which picks the web process; ``ws-a``: a websocket with the org's dashboard session straight to web A), and
        when a stream breaks or is refused (a process killed, an outage), again over SSE through the proxy, until
        ``run.finished`` or the deadline; then the REST API as a last word."""
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
                # Straight to web A (not through the proxy, which would pick either): the load's check is that a
                # websocket on web A receives the events of runs executed by worker B.
                await ws_watch(
                    self.cluster.direct_url("web-a"),
                    run_id,
                    cookies,
                    origin=self.cluster.origin(),
                    tls=self.cluster.client_tls,
                    timeout=min(left, 20.0),
                    result=record.stream,
                )
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

    def close(self) -> None:
        self.cluster.close()
