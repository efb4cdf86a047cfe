"""Figures -> the markdown table and the JSON file under ``bench/results/``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TIMES = "\N{MULTIPLICATION SIGN}"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROXIES = ("cesaflow-daphne", "cesaflow-uvicorn", "floor-daphne", "floor-uvicorn")
SERVERS = ("daphne", "uvicorn")


@dataclass(frozen=True)
class Figure:
    """One measured value; ``prefix`` qualifies it ("≥" when the harness, not the target, was the limit)."""

    value: float | None
    prefix: str = ""
    note: str = ""


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    digits: int
    target: str  # as the issue states it
    check: Callable[[float, float | None], bool] | None  # (cesaflow value, floor value) -> met?
    lower_is_better: bool = True


def _within(limit: float, floor_factor: float | None = None) -> Callable[[float, float | None], bool]:
    def check(value: float, floor: float | None) -> bool:
        if value > limit:
            return False
        # A ratio against a floor of (nearly) zero is meaningless: within 1 ms of the floor counts as met.
        return floor_factor is None or floor is None or value <= max(floor * floor_factor, floor + 1.0)

    return check


def _at_least(limit: float) -> Callable[[float, float | None], bool]:
    return lambda value, _floor: value >= limit


METRICS = (
    Metric("cpu_ms_per_stream", "CPU per 10-token streamed request", "ms", 2, "—", None),
    Metric(
        "seq_added_ttft_p50", "Added TTFT p50, sequential", "ms", 2, f"≤ 5 ms and ≤ 1.3{TIMES} floor", _within(5, 1.3)
    ),
    Metric("seq_added_ttft_p95", "Added TTFT p95, sequential", "ms", 2, "—", None),
    Metric(
        "seq_added_ttft_p99", "Added TTFT p99, sequential", "ms", 2, f"≤ 10 ms and ≤ 1.3{TIMES} floor", _within(10, 1.3)
    ),
    Metric("load_added_ttft_p50", "Added TTFT p50, 50 paced streams", "ms", 2, "≤ 8 ms", _within(8)),
    Metric("load_added_ttft_p95", "Added TTFT p95, 50 paced streams", "ms", 2, "—", None),
    Metric("load_added_ttft_p99", "Added TTFT p99, 50 paced streams", "ms", 2, "≤ 30 ms", _within(30)),
    Metric("cpu_share_50_paced", "CPU of the process with 50 paced streams", "% of a core", 0, "—", None),
    Metric(
        "paced_streams_cpu",
        "Paced streams per process, CPU-bound estimate (50 / CPU share)",
        "streams",
        0,
        "≥ 75",
        _at_least(75),
        lower_is_better=False,
    ),
    Metric(
        "paced_streams_max",
        "Paced streams sustained, measured ladder",
        "streams",
        0,
        "≥ 75",
        _at_least(75),
        lower_is_better=False,
    ),
    Metric("saturation_streams_per_s", "Streams/s at saturation (100 tokens)", "/s", 0, "—", None, False),
    Metric("saturation_chunks_per_s", "Chunks/s at saturation", "/s", 0, "—", None, False),
    Metric(
        "one_stream_chunks_per_s",
        "Chunks/s on one 2,000-token stream",
        "/s",
        0,
        "≥ 15,000",
        _at_least(15_000),
        lower_is_better=False,
    ),
    Metric("cpu_us_per_chunk", "CPU per chunk, one unpaced stream", "µs", 0, "—", None),
    Metric("rss_idle_mb", "RSS idle (after warm-up)", "MB", 1, "≤ 120 MB", _within(120)),
    Metric("rss_per_stream_kb", "RSS per open stream", "KB", 1, "≤ 100 KB", _within(100)),
    Metric("api_rps", "Plain API requests/s", "/s", 0, "≥ 250", _at_least(250), lower_is_better=False),
    Metric("cpu_ms_per_api_request", "CPU per plain API request", "ms", 2, "—", None),
    Metric("close_p50_ms", "Upstream closed after disconnect, p50", "ms", 1, "—", None),
    Metric("close_max_ms", "Upstream closed after disconnect, max", "ms", 1, "≤ 100 ms", _within(100)),
)


def _format(figure: Figure | None, metric: Metric) -> str:
    if figure is None or figure.value is None or math.isnan(figure.value):
        return figure.note if figure is not None and figure.note else "n/a"
    return f"{figure.prefix}{figure.value:,.{metric.digits}f}"


def _ratio(cf: Figure | None, floor: Figure | None) -> str:
    if cf is None or floor is None or cf.value is None or floor.value is None or floor.value == 0:
        return "n/a"
    return f"{cf.value / floor.value:.2f}{TIMES}"


def markdown_table(figures: dict[str, dict[str, Figure]]) -> str:
    """Rows: metrics; columns: the four proxies, then CesaFlow/floor per server, the target and whether it is
    met (per server, "daphne / uvicorn")."""
    head = (
        "| metric | CesaFlow daphne | CesaFlow uvicorn | floor daphne | floor uvicorn "
        "| ratio vs floor (d / u) | target | met? (d / u) |"
    )
    lines = [head, "|" + "---|" * 8]
    for metric in METRICS:
        by_target = figures.get(metric.key, {})
        cells = [_format(by_target.get(name), metric) for name in PROXIES]
        ratios = " / ".join(
            _ratio(by_target.get(f"cesaflow-{server}"), by_target.get(f"floor-{server}")) for server in SERVERS
        )
        met = []
        for server in SERVERS:
            cf, floor = by_target.get(f"cesaflow-{server}"), by_target.get(f"floor-{server}")
            if metric.check is None:
                met.append("—")
            elif cf is None or cf.value is None:
                met.append("n/a")
            elif metric.check(cf.value, floor.value if floor else None):
                met.append("yes")
            else:
                # "≥ N": the harness ran out before the proxy did, so a miss cannot be claimed.
                met.append("inconclusive" if cf.prefix.startswith("≥") else "**no**")
        label = f"{metric.label} ({metric.unit})"
        lines.append(f"| {label} | {' | '.join(cells)} | {ratios} | {metric.target} | {' / '.join(met)} |")
    return "\n".join(lines)


def save(document: dict[str, Any], *, quick: bool) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"bench-{stamp}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(document, indent=2, default=_jsonable))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Figure):
        return {"value": value.value, "prefix": value.prefix, "note": value.note}
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
