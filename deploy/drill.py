#!/usr/bin/env python3
"""The deployment drill (issue #15, points 3 and 4): CesaFlow as a multi-process deployment under load, and what
happens to it when a worker, Redis, PostgreSQL or a web process goes away.

    python deploy/drill.py            # bounded: 24 chat + 4 agent runs, short executor timings (about 2 minutes)
    python deploy/drill.py --full     # 200 chat + 20 agent runs, the default timings of the README (about 3 minutes)
    python deploy/drill.py --json out.json --markdown out.md

It starts, on loopback and of its own: PostgreSQL and Redis (throwaway, from the installed binaries; never the
machine's), the provider simulator, two web processes (``python -m cesaflow.serve``, worker executor mode,
production settings with throwaway secrets) and two ``run_worker`` processes; seeds four organizations (admin and
developer, org API key, provider key on the simulator); puts the TLS proxy in front of both web processes (Caddy
with deploy/proxy/Caddyfile and a throwaway certificate; without Caddy installed the drill runs without it and says
so); runs the load through the proxy over HTTPS (REST API, SSE, the login form) and websockets (a dashboard session
connected to web A directly); and, during the load, the four fault drills. Each drill's expected
outcome is written (the catalogue in ``run``) before it runs, then checked; a table of drill, expected, observed,
pass/fail and timings is printed at the end. Exit status 0 only if every row passed. Everything it started is
stopped when it ends, however it ends (each child dies with it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy import drill_faults as faults
from deploy.drill_core import Drill, Plan, Row

__all__ = ["ALL_DRILLS", "Plan", "Row", "main", "run_drill", "table"]


async def run(drill: Drill, drills: list[str]) -> list[Row]:
    await drill.sign_in_all()
    t = drill.plan.timings
    proxied = drill.cluster.proxied
    via = "through the proxy, which only web A answers" if proxied else "to web A"
    started = time.monotonic()
    load = asyncio.create_task(drill.load())
    await asyncio.sleep(min(5.0, drill.plan.load_seconds / 8))
    catalogue: dict[str, tuple[str, Callable[[Row], Awaitable[None]]]] = {
        "worker-kill": (
            f"SIGKILL worker A while it executes runs (chat and agent): they become failed/worker_lost within "
            f"stale-after + heartbeat = {t.lost_bound_s:g} s; runs on worker B and other runs end succeeded; "
            "worker A's agent workspaces are deleted",
            partial(faults.worker_kill, drill),
        ),
        "web-kill": (
            "SIGKILL web B with open websockets on it (dashboard session, connected to web B directly): they drop; "
            f"the clients reconnect {via}, get the run's current status first (as in the database) and follow it "
            "to run.finished succeeded",
            partial(faults.web_kill, drill),
        ),
        "postgres-restart": (
            f"stop PostgreSQL for {drill.plan.outage_seconds:g} s under load: every API request and /readyz "
            "answers 503 meanwhile (no 500), within the pool timeout + 3 s; all answer 200 within 60 s of its "
            "return; runs that end during the outage are recorded with exactly their usage",
            partial(faults.postgres_restart, drill),
        ),
        "redis-restart": (
            f"kill Redis for {drill.plan.outage_seconds:g} s (it restarts empty): a dashboard page with a valid "
            "session is refused 503 meanwhile, never let in; after, the old session is signed out and a new "
            f"sign-in works; open websockets end (run.finished or a close) within {t.revalidate_s + 20} s; no "
            "run stays queued or running",
            partial(faults.redis_restart, drill),
        ),
    }
    for name in drills:
        expected, body = catalogue[name]
        await drill.run_drill(Row(drill=name, expected=expected), body)
    await load
    load_seconds = time.monotonic() - started
    row = Row(
        drill="load",
        expected=(
            f"{drill.plan.chat_runs} chat + {drill.plan.agent_runs} agent runs from {drill.plan.orgs} orgs through "
            + ("Caddy over TLS to both web processes (REST, SSE, sign-in)" if proxied else "both web processes")
            + " and websockets: every run terminal; per run, one usage row per provider call the simulator served "
            "(a run lost with its worker may miss its call in flight); a websocket connected to web A directly "
            "receives events of runs executed by worker B"
        ),
    )
    await drill.run_drill(row, lambda r: faults.check_load(drill, r, load_seconds))
    return drill.rows


def table(rows: list[Row]) -> str:
    lines = ["| drill | expected | observed | result | timings |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [row.drill, row.expected, row.observed, "pass" if row.passed else "**FAIL**", row.timings]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


ALL_DRILLS = ["worker-kill", "web-kill", "postgres-restart", "redis-restart"]


def run_drill(plan: Plan, workdir: Path, drills: list[str], *, notes: list[str] | None = None) -> list[Row]:
    """Start everything, run the load and the drills, stop everything; the rows of the table. ``notes`` gets how
    the clients reached the web processes (through the proxy or not)."""
    drill = Drill(plan, workdir)
    if notes is not None:
        notes.append(drill.cluster.proxy_note)
    try:
        drill.start()
        return asyncio.run(_run(drill, drills))
    finally:
        drill.close()


async def _run(drill: Drill, drills: list[str]) -> list[Row]:
    try:
        return await run(drill, drills)
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
    notes: list[str] = []
    try:
        rows = run_drill(plan, workdir, drills, notes=notes)
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
    print(f"clients: {'; '.join(notes)}")
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2))
    if args.markdown:
        args.markdown.write_text(table(rows) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
