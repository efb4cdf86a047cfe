"""How much the benchmark measures (full or quick), its command line, and the helpers every phase shares."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from bench.harness import PRIVATE_POSTGRES

T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to do. Full: 10-12 minutes on 2 cores; quick: about 4 minutes."""

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
    run_rounds: int  # run stream: rounds over every (executor, transport), each ...
    run_samples: int  # ... this many runs back to back
    deadline_s: float


FULL = Plan(
    seq_rounds=10,
    seq_requests=30,
    load_rounds=3,
    load_ramp_s=1.0,
    load_window_s=5.0,
    sat_rounds=2,
    sat_concurrency=50,  # issue #13: "streams/s at saturation (50 clients)"
    sat_window_s=3.0,
    long_rounds=5,
    api_rounds=2,
    api_concurrency=16,
    api_window_s=3.0,
    close_trials=15,
    capacity_steps=(50, 75, 100, 125, 150, 200, 300),
    capacity_window_s=2.0,
    rss_counts=(50, 250),
    run_rounds=5,
    run_samples=10,
    deadline_s=25 * 60,
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
    run_rounds=2,
    run_samples=5,
    deadline_s=7 * 60,
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


PHASES = ("seq", "load", "saturation", "long", "api", "close", "capacity", "runs", "memory")


def parse_args(argv: list[str] | None = None, *, description: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
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
    parser.add_argument(
        "--no-litellm", action="store_true", help="Leave LiteLLM out (no install, no process; its column says so)."
    )
    parser.add_argument("--keep-workdir", action="store_true", help="Keep the logs of the processes under test.")
    return parser.parse_args(argv)
