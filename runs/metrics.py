"""The runs' shared state for /metrics (``cesaflow.lib.metrics.SHARED_REGISTRY``), read from the database when
scraped: ``cesaflow_runs{kind,status}`` (queued and running runs, over every executor) and
``cesaflow_run_queue_depth`` (runs waiting to start). One grouped query on the ``(status, created_at)`` index.
Ended runs are counted by the processes that record them (``cesaflow_runs_finished_total``)."""

from __future__ import annotations

from collections.abc import Iterator

from django.db.models import Count
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runs.models import Run, RunKind, RunStatus

OPEN_STATUSES = (RunStatus.QUEUED, RunStatus.RUNNING)


class RunStatesCollector(Collector):
    def describe(self) -> Iterator[Metric]:
        """The names, for the registry's duplicate check, without a query (it runs at startup)."""
        yield GaugeMetricFamily("cesaflow_runs", "", labels=["kind", "status"])
        yield GaugeMetricFamily("cesaflow_run_queue_depth", "")

    def collect(self) -> Iterator[Metric]:
        counts = {(kind, status): 0 for kind in RunKind.values for status in OPEN_STATUSES}
        rows = Run.objects.filter(status__in=OPEN_STATUSES).values_list("kind", "status").annotate(n=Count("id"))
        for kind, status, n in rows:
            counts[(kind, status)] = n
        runs = GaugeMetricFamily("cesaflow_runs", "Runs queued or running now, by kind.", labels=["kind", "status"])
        for (kind, status), n in sorted(counts.items()):
            runs.add_metric([kind, status], n)
        yield runs
        yield GaugeMetricFamily(
            "cesaflow_run_queue_depth",
            "Runs waiting for an executor.",
            value=sum(n for (_kind, status), n in counts.items() if status == RunStatus.QUEUED),
        )
