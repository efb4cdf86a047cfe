"""``manage.py run_worker``: execute queued runs (``CESAFLOW_EXECUTOR=worker``).

Start any number, on any machines that share PostgreSQL and Redis. Each claims queued runs with row locks (a run
executes exactly once), streams them to the channel layer, heartbeats them, and marks runs of workers that died
failed (``worker_lost``). SIGTERM or Ctrl-C: stop claiming, give running runs ``--grace`` seconds, then stop them
and record them failed, so nothing is left ``running``.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection

from cesaflow.lib.heap import freeze_startup_objects
from cesaflow.lib.metrics import serve_process_metrics
from runs.executor import Executor, ExecutorConfig


class Command(BaseCommand):
    help = "Execute queued runs: claim, stream, heartbeat, and reap runs of workers that died."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--concurrency",
            type=int,
            default=None,
            help="Runs executing at once (default CESAFLOW_RUN_WORKER_CONCURRENCY, 100).",
        )
        parser.add_argument("--heartbeat", type=float, default=None, help="Seconds between heartbeats (default 10).")
        parser.add_argument(
            "--stale-after",
            type=float,
            default=None,
            help="Seconds without a heartbeat after which another worker's run is lost (default 30).",
        )
        parser.add_argument("--poll", type=float, default=None, help="Seconds between looks at the queue (default 2).")
        parser.add_argument(
            "--grace",
            type=float,
            default=None,
            help="Seconds running runs get to finish on shutdown (default CESAFLOW_RUN_SHUTDOWN_GRACE_SECONDS, 10).",
        )
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=None,
            help="Serve this worker's Prometheus metrics at /metrics on this port (needs CESAFLOW_METRICS_TOKEN).",
        )
        parser.add_argument(
            "--metrics-host", default="127.0.0.1", help="Address for --metrics-port (default 127.0.0.1)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if connection.vendor != "postgresql":
            raise CommandError("run_worker needs PostgreSQL (DATABASE_URL): it claims runs with row locks.")
        backend = settings.CHANNEL_LAYERS.get("default", {}).get("BACKEND", "")
        if "InMemory" in backend:
            raise CommandError("run_worker needs Redis (REDIS_URL): its events must reach the web processes.")
        overrides: dict[str, Any] = {}
        for option, name in (
            ("concurrency", "concurrency"),
            ("heartbeat", "heartbeat_s"),
            ("stale_after", "stale_after_s"),
            ("poll", "poll_s"),
        ):
            if options[option] is not None:
                overrides[name] = options[option]
        config = ExecutorConfig.from_settings(claim_queued=True, reap=True, **overrides)
        if config.concurrency < 1 or config.heartbeat_s <= 0 or config.poll_s <= 0:
            raise CommandError("--concurrency, --heartbeat and --poll must be positive.")
        if config.stale_after_s < 2 * config.heartbeat_s:
            raise CommandError("--stale-after must be at least twice --heartbeat.")
        grace = options["grace"] if options["grace"] is not None else settings.RUN_SHUTDOWN_GRACE_SECONDS
        if options["metrics_port"] is not None:
            if not settings.METRICS_TOKEN:
                raise CommandError("--metrics-port needs CESAFLOW_METRICS_TOKEN (scrapers present it).")
            serve_process_metrics(
                host=options["metrics_host"], port=options["metrics_port"], token=settings.METRICS_TOKEN
            )
        # The ORM is used through sync_to_async from here on; this thread's connection is not needed.
        connection.close()
        freeze_startup_objects()
        asyncio.run(self._serve(config, grace_s=max(0.0, grace)))

    async def _serve(self, config: ExecutorConfig, *, grace_s: float) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        executor = Executor(config=config, label="worker")
        executor.start()
        self.stdout.write(f"run_worker {executor.worker_id} ready (concurrency {config.concurrency})")
        await stop.wait()
        self.stdout.write(f"run_worker {executor.worker_id} stopping (grace {grace_s:g} s)")
        await executor.stop(grace_s=grace_s)
        self.stdout.write(f"run_worker {executor.worker_id} stopped")
