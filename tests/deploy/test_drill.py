"""The bounded deployment drill (``python deploy/drill.py``) with real processes: its own throwaway PostgreSQL and
Redis, the provider simulator, two web processes behind the TLS proxy (Caddy, when installed), two ``run_worker``
processes, 24 chat and 4 agent runs from four organizations through the proxy over HTTPS, and the four fault drills
during that load. It runs once for the module (about two minutes on a 2-core machine); each test checks one row of
its table, whose expected outcome the drill wrote before it ran.
Deselect with ``-m "not drill"``."""

from __future__ import annotations

import pytest

from deploy.drill import ALL_DRILLS, Plan, Row, run_drill, table

pytestmark = [pytest.mark.drill, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict[str, Row]:
    done = run_drill(Plan.bounded(), tmp_path_factory.mktemp("drill"), ALL_DRILLS)
    print(table(done))  # shown with the failure report
    return {row.drill: row for row in done}


def check(rows: dict[str, Row], name: str) -> None:
    row = rows[name]
    assert row.passed, f"{name}\nexpected: {row.expected}\nobserved: {row.observed}"


def test_load_through_two_webs_and_two_workers_ends_every_run_with_usage_recorded_once(rows):
    check(rows, "load")


def test_sigkilled_worker_runs_become_worker_lost_within_the_bound_and_its_workspaces_go(rows):
    check(rows, "worker-kill")


def test_redis_restart_fails_sessions_closed_ends_streams_and_leaves_no_run_running(rows):
    check(rows, "redis-restart")


def test_postgres_restart_answers_503_recovers_and_records_the_runs_that_ended_meanwhile(rows):
    check(rows, "postgres-restart")


def test_sigkilled_web_process_websockets_reconnect_to_the_other_and_see_the_current_status(rows):
    check(rows, "web-kill")


def test_every_drill_ran(rows):
    assert set(rows) == {*ALL_DRILLS, "load"}
