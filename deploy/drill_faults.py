"""The fault drills and the load's final check, each a function of the :class:`~deploy.drill_core.Drill` under
load. Each fills its row of the table: what it observed, pass or fail, timings. The expected outcomes are written
in ``deploy/drill.py`` before each drill runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx

from deploy.drill_client import TERMINAL, StreamResult, Tally, ws_read
from deploy.drill_core import NONCE_RE, Drill, Row, secs


async def worker_kill(drill: Drill, row: Row) -> None:
    def on_a(runs: dict[str, dict[str, Any]]) -> list[str]:
        return [
            run_id
            for run_id, run in runs.items()
            if run["status"] == "running" and drill.worker_of(run["worker_id"]) == "worker-a"
        ]

    bound = drill.plan.timings.lost_bound_s
    # Worker B is paused (SIGSTOP) while the victims are claimed, so worker A gets them, agent runs included
    # (their workspaces must be cleaned up); B resumes well within stale-after, before anything could reap it.
    pause = min(5.0, drill.plan.timings.stale_after_s / 2)
    drill.cluster.children["worker-b"].signal(signal.SIGSTOP)
    paused_at = time.monotonic()
    try:
        tasks = await drill.victims(6, "worker-kill", agents=2)
        await drill.wait_db(
            lambda runs: sum(1 for r in on_a(runs) if drill.runs.get(r) and drill.runs[r].source == "worker-kill") >= 8,
            max(0.1, pause - (time.monotonic() - paused_at)),
        )
    finally:
        drill.cluster.children["worker-b"].signal(signal.SIGCONT)

    def ready(runs: dict[str, dict[str, Any]]) -> bool:
        hit = on_a(runs)
        live = [r for r in hit if (drill.cluster.workspace_root / uuid.UUID(r).hex).exists()]
        return len(hit) >= 2 and any(runs[r]["kind"] == "agent" for r in live)

    # Wait until worker A executes runs, ideally an agent run (its workspace must be cleaned up).
    if await drill.wait_db(ready, 20) is None:
        await drill.wait_db(lambda runs: bool(on_a(runs)), 10)
    # One snapshot for both: a run worker A claimed between two reads would count as another worker's, yet die with A.
    before = await drill.db()
    victims = on_a(before)
    workspaces = [drill.cluster.workspace_root / uuid.UUID(r).hex for r in victims]
    workspaces = [path for path in workspaces if path.exists()]
    others = [r for r, run in before.items() if run["status"] == "running" and r not in victims]
    drill.cluster.kill("worker-a")
    drill.killed.add("worker-a")
    killed_at = time.monotonic()

    def lost(runs: dict[str, dict[str, Any]]) -> bool:
        return all(runs[r]["status"] in TERMINAL for r in victims)

    took = await drill.wait_db(lost, bound + 20)
    after = await drill.db()
    lost_ok = [r for r in victims if after[r]["status"] == "failed" and after[r]["error_kind"] == "worker_lost"]
    gone_deadline = time.monotonic() + bound + 2 * drill.plan.timings.heartbeat_s + 10
    while any(path.exists() for path in workspaces) and time.monotonic() < gone_deadline:
        await asyncio.sleep(0.25)
    left = [path.name for path in workspaces if path.exists()]
    cleaned_after = time.monotonic() - killed_at
    drill.worker_pids[drill.cluster.start_worker("worker-a2").pid] = "worker-a2"  # capacity back for the rest
    results = [record for record in await asyncio.gather(*tasks) if record is not None]
    survivors = [r for r in results if r.run_id not in victims]
    bad_survivors = [r.run_id[:8] for r in survivors if r.final_status != "succeeded"]
    others_final = await drill.db()
    others_bad = [r[:8] for r in others if others_final[r]["status"] != "succeeded"]
    lost_watchers = [r for r in results if r.run_id in victims and r.kind == "chat"]
    told = sum(1 for r in lost_watchers if r.stream.final_status == "failed")
    row.passed = (
        len(victims) > 0
        and len(workspaces) > 0
        and took is not None
        and took <= bound + drill.plan.timings.poll_s + 2  # the reaper's tick and one database round trip
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


async def web_kill(drill: Drill, row: Row) -> None:
    org = drill.orgs[0]
    cookies = drill.sessions[org.org_id]
    ids = [await drill.create(org, {"model": "fake/drill_long"}, web=0, source="web-kill") for _ in range(3)]
    ids = [run_id for run_id in ids if run_id]
    # Straight to web B (the proxy would pick either); they come back through the proxy, which only web A answers.
    base_b = drill.cluster.direct_url("web-b")
    sockets = [await drill.ws_connect(base_b, run_id, cookies) for run_id in ids]
    first = [StreamResult() for _ in ids]
    reads = [asyncio.create_task(ws_read(s, r, timeout=60)) for s, r in zip(sockets, first, strict=True)]
    deadline = time.monotonic() + 20
    while any(r.text_deltas < 2 for r in first) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    port_b = drill.cluster.children["web-b"].port
    drill.cluster.kill("web-b")
    killed_at = time.monotonic()
    await asyncio.gather(*reads)
    for socket in sockets:
        await socket.close(timeout=0.5)
    dropped = sum(1 for r in first if r.close_code is not None or r.error)

    async def reconnect(run_id: str) -> tuple[float, str, set[str], StreamResult]:
        status_before = (await drill.db())[run_id]["status"]
        socket = await drill.ws_connect(drill.cluster.base_url("web-a"), run_id, cookies)
        result = StreamResult()
        reading = asyncio.create_task(ws_read(socket, result, timeout=60))
        while result.events == 0 and not reading.done():
            await asyncio.sleep(0.02)
        reconnected = time.monotonic() - killed_at
        status_after = (await drill.db())[run_id]["status"]
        await reading
        await socket.close(timeout=0.5)
        return reconnected, result.first_status, {status_before, status_after}, result

    outcomes = await asyncio.gather(*(reconnect(run_id) for run_id in ids))
    drill.cluster.start_web("web-b", port_b)  # back on its address, for the rest of the load
    current = sum(1 for _, snapshot, db_status, _ in outcomes if snapshot in db_status)
    finished = sum(1 for *_, result in outcomes if result.final_status == "succeeded")
    slowest = max((took for took, *_ in outcomes), default=0.0)
    row.passed = bool(ids) and dropped == len(ids) and current == len(ids) and finished == len(ids)
    row.observed = (
        f"{len(ids)} websockets on web B saw text, then {dropped} dropped at the kill; reconnected "
        f"{'through the proxy (web B down: on web A)' if drill.cluster.proxied else 'to web A'} "
        f"within {slowest:.2f} s; {current}/{len(ids)} snapshots matched the database's status; "
        f"{finished}/{len(ids)} followed to run.finished succeeded"
    )
    row.timings = f"reconnected within {slowest:.2f} s"


async def postgres_restart(drill: Drill, row: Row) -> None:
    org = drill.orgs[1]
    pool_timeout = float(drill.cluster.env.get("CESAFLOW_DB_POOL_TIMEOUT", "10"))
    # Victims that end while the database is away: their end and usage must be recorded once it is back.
    ids = [await drill.create(org, {"model": "fake/drill_mid"}, web=n, source="postgres-restart") for n in range(3)]
    ids = [run_id for run_id in ids if run_id]
    watchers = [asyncio.create_task(drill.watch(run_id, ("sse-a", "sse-b")[n % 2], timeout=120)) for n, run_id in
                enumerate(ids)]  # fmt: skip
    deadline = time.monotonic() + 20
    while any(drill.runs[r].stream.text_deltas == 0 for r in ids) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # each is streaming: its key is open, its provider call under way
    api, ready = Tally(), Tally()
    slowest = 0.0
    drill.cluster.stop_postgres()
    stopped_at, stopped_clock = time.monotonic(), _clock()
    turn = 0
    while time.monotonic() - stopped_at < drill.plan.outage_seconds:
        base = drill.bases()[turn % 2]
        turn += 1
        calls = ((api, drill.client.list_runs(base, org)), (ready, drill.client.http.get(f"{base}/readyz")))
        for tally, call in calls:
            sent = time.monotonic()
            try:
                tally.add(str((await call).status_code))
            except httpx.HTTPError as exc:
                tally.add(type(exc).__name__)
            slowest = max(slowest, time.monotonic() - sent)
        await asyncio.sleep(0.2)
    drill.cluster.start_postgres_again()
    back_at, back_clock = time.monotonic(), _clock()
    recovered: float | None = None
    while time.monotonic() - back_at < 60:
        try:
            answers = [await drill.client.list_runs(base, org) for base in drill.bases()]
            if all(answer.status_code == 200 for answer in answers):
                recovered = time.monotonic() - back_at
                break
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.25)
    await asyncio.gather(*watchers)
    calls_served = await drill.simulator_calls()
    runs = await drill.db()
    victims = [runs[r] for r in ids]
    exact = sum(
        1 for r, run in zip(ids, victims, strict=True) if run["usage_rows"] == calls_served.get(drill.runs[r].nonce)
    )
    statuses = ", ".join(run["status"] + (f"/{run['error_kind']}" if run["error_kind"] else "") for run in victims)
    reapers = _reapers(drill, [r for r, run in zip(ids, victims, strict=True) if run["error_kind"] == "worker_lost"])
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
        f"during {drill.plan.outage_seconds:g} s down: API {api}, /readyz {ready}, slowest answer {slowest:.1f} s "
        f"(pool timeout {pool_timeout:g} s); all 200 again {secs(recovered)} after PostgreSQL was back; "
        f"{len(ids)} runs that ended during the outage: {statuses}{reapers}, usage rows = calls served for {exact}"
    )
    if not row.passed:
        row.observed += f"; PostgreSQL stopped at {stopped_clock}, started again at {back_clock}"
    row.timings = f"503 within {slowest:.1f} s, recovered {secs(recovered)} after restart"


def _clock() -> str:
    """Now, as the processes' logs write it (UTC, to the millisecond)."""
    return datetime.now(UTC).strftime("%H:%M:%S.%f")[:12]


def _reapers(drill: Drill, run_ids: list[str]) -> str:
    """Which processes logged reaping these runs, and when (what a failed row needs; the drill's logs are gone)."""
    seen = []
    for child in drill.cluster.children.values():
        for line in child.log_tail(5000).splitlines():
            if "reaped" in line and any(run_id in line for run_id in run_ids):
                with contextlib.suppress(ValueError, KeyError, TypeError):  # a line not of our JSON logs
                    seen.append(f"{child.name} at {json.loads(line)['time'][11:23]}")
    return f" (reaped by {'; '.join(seen)})" if seen else ""


async def redis_restart(drill: Drill, row: Row) -> None:
    org = drill.orgs[2]
    base_a = drill.cluster.base_url("web-a")
    cookies = drill.sessions[org.org_id]
    ids = [await drill.create(org, {"model": "fake/drill_long"}, web=0, source="redis-restart") for _ in range(2)]
    ids = [run_id for run_id in ids if run_id]
    streams = [StreamResult() for _ in ids]
    sockets = [await drill.ws_connect(base_a, run_id, cookies) for run_id in ids]
    reads = [asyncio.create_task(ws_read(s, r, timeout=120)) for s, r in zip(sockets, streams, strict=True)]
    deadline = time.monotonic() + 20
    while any(r.text_deltas < 1 for r in streams) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    before = {r for r, run in (await drill.db()).items() if run["status"] in ("running", "queued")}
    pages = Tally()
    drill.cluster.stop_redis()
    stopped_at = time.monotonic()
    turn = 0
    while time.monotonic() - stopped_at < drill.plan.outage_seconds:
        try:
            pages.add(str((await drill.client.page(drill.bases()[turn % 2], "/team/", cookies)).status_code))
        except httpx.HTTPError as exc:
            pages.add(type(exc).__name__)
        turn += 1
        await asyncio.sleep(0.2)
    drill.cluster.start_redis_again()
    back_at = time.monotonic()
    old = await drill.client.page(base_a, "/team/", cookies)
    signed_out = old.status_code == 302 and "/login" in old.headers.get("location", "")
    fresh: dict[str, str] = {}
    dashboard = 0
    while time.monotonic() - back_at < 20 and dashboard != 200:
        try:
            fresh = await drill.client.sign_in(base_a, org)
            dashboard = (await drill.client.page(base_a, "/team/", fresh)).status_code if fresh else 0
        except httpx.HTTPError:
            dashboard = 0
        if dashboard != 200:
            await asyncio.sleep(0.5)
    signed_in_after = time.monotonic() - back_at
    if fresh:
        drill.sessions[org.org_id] = fresh
    # Streams: each must end (its run's end, or a close) within the re-check interval and some slack.
    stream_deadline = drill.plan.timings.revalidate_s + 20
    done, pending = await asyncio.wait(reads, timeout=stream_deadline)
    for task in pending:
        task.cancel()
    for socket in sockets:
        await socket.close(timeout=0.5)
    ends = [r.final_status or f"close {r.close_code}" if r.close_code else r.final_status or r.error for r in streams]
    clean = len(done) == len(reads) and all(end for end in ends)
    bound = drill.plan.timings.lost_bound_s + 60  # the longest victim, the reaper, and the attach window
    waited = await drill.wait_db(lambda runs: all(runs[r]["status"] in TERMINAL for r in before), bound)
    took = None if waited is None else time.monotonic() - back_at
    stuck = (
        []
        if took is not None
        else [r[:8] for r, run in (await drill.db()).items() if r in before and run["status"] not in TERMINAL]
    )
    row.passed = set(pages.counts) == {"503"} and signed_out and dashboard == 200 and clean and took is not None
    row.observed = (
        f"dashboard with a session during {drill.plan.outage_seconds:g} s down: {pages}; old session after: "
        f"{old.status_code} {'to sign-in' if signed_out else old.headers.get('location', '')}; new sign-in: "
        f"dashboard {dashboard} after {signed_in_after:.1f} s; {len(streams)} open websockets ended: "
        f"{', '.join(ends) or '-'}; {len(before)} runs queued/running at the outage: "
        + (f"all terminal {secs(took)} after Redis was back" if took is not None else f"stuck: {', '.join(stuck)}")
    )
    row.timings = f"sign-in after {signed_in_after:.1f} s, runs terminal after {secs(took)}"


async def check_load(drill: Drill, row: Row, load_seconds: float) -> None:
    settle = drill.plan.timings.lost_bound_s + 60
    took = await drill.wait_db(lambda runs: all(run["status"] in TERMINAL for run in runs.values()), settle)
    runs = await drill.db()
    calls = await drill.simulator_calls()
    by_status: dict[str, int] = {}
    mismatched: list[str] = []
    for run_id, run in runs.items():
        key = f"{run['kind']} {run['status']}" + (f"/{run['error_kind']}" if run["error_kind"] else "")
        by_status[key] = by_status.get(key, 0) + 1
        found = NONCE_RE.search(run["objective"])
        served = calls.get(found.group(0), 0) if found else 0
        missing = served - run["usage_rows"]
        # A run whose worker was SIGKILLed may leave the one call in flight at the kill unrecorded.
        allowed = (0, 1) if drill.worker_of(run["worker_id"]) in drill.killed else (0,)
        if missing not in allowed:
            mismatched.append(f"{run_id[:8]} ({run['status']}: {served} calls, {run['usage_rows']} rows)")
    not_terminal = [r[:8] for r, run in runs.items() if run["status"] not in TERMINAL]
    watched_on_a = [
        record
        for record in drill.runs.values()
        if record.via == "ws-a" and record.stream.text_deltas > 0 and record.run_id in runs
    ]
    from_b = [r for r in watched_on_a if drill.worker_of(runs[r.run_id]["worker_id"]) == "worker-b"]
    load = [r for r in drill.runs.values() if r.source == "load"]
    unwatched = [
        f"{r.run_id[:8]} ({r.via}, {r.reconnects} reconnects, {r.stream.error or r.stream.close_code or '-'})"
        for r in drill.runs.values()
        if r.run_id in runs and runs[r.run_id]["error_kind"] == "not_watched"
    ]
    reconnects = sum(r.reconnects for r in drill.runs.values())
    row.passed = (
        took is not None
        and not not_terminal
        and not mismatched
        and bool(from_b)
        and len(load) == drill.plan.chat_runs + drill.plan.agent_runs
    )
    row.observed = (
        f"{len(load)} load runs + {len(runs) - len(load)} drill runs, all terminal: {not not_terminal}"
        f" ({', '.join(f'{k} {v}' for k, v in sorted(by_status.items()))}); usage rows = provider calls "
        f"served for {len(runs) - len(mismatched)}/{len(runs)} runs ({sum(calls.values())} calls)"
        f"{'; mismatched: ' + ', '.join(mismatched[:5]) if mismatched else ''}; websocket on web A received "
        f"events of {len(from_b)} runs executed by worker B ({len(watched_on_a)} watched there); creates: "
        f"{drill.create_statuses}; streams reopened {reconnects} times ({drill.silent_sockets} websockets silent)"
        + (f"; not watched in time: {', '.join(unwatched[:5])}" if unwatched else "")
    )
    row.timings = f"load {load_seconds:.0f} s, settled {took if took is None else round(took, 1)} s after"
