"""Figures -> the markdown table and the JSON file under ``bench/results/``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TIMES = "\N{MULTIPLICATION SIGN}"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROXIES = ("cesaflow-daphne", "cesaflow-uvicorn", "floor-daphne", "floor-uvicorn")
LITELLM = "litellm"
COLUMNS = (*PROXIES, LITELLM)
SERVERS = ("daphne", "uvicorn")


@dataclass(frozen=True)
class Figure:
    """One measured value; ``prefix`` qualifies it ("≥" when the harness, not the target, was the limit)."""

    value: float | None
    prefix: str = ""
    note: str = ""


@dataclass(frozen=True)
class Goal:
    """A target as issue #13 states it (or, for figures it does not name, the earlier gateway targets): an absolute
    limit and/or a factor of the floor's and of LiteLLM's figure from the same run, on the same server."""

    limit: float | None = None
    floor: float | None = None  # CesaFlow at most (or at least) this times the floor's
    litellm: float | None = None  # ... and this times LiteLLM's
    higher_is_better: bool = False
    # A ratio against a floor of (nearly) zero is meaningless: within this much of the floor counts as met.
    floor_slack: float = 0.0
    unit: str = ""

    def text(self) -> str:
        sign = "≥" if self.higher_is_better else "≤"
        parts = []
        if self.limit is not None:
            parts.append(f"{sign} {self.limit:,.0f}{f' {self.unit}' if self.unit else ''}")
        if self.floor is not None:
            parts.append(f"{sign} {self.floor:g}{TIMES} floor")
        if self.litellm is not None:
            parts.append(f"{sign} {self.litellm:g}{TIMES} LiteLLM")
        return ", ".join(parts)

    def verdict(self, value: float, floor: float | None, litellm: float | None) -> str:
        """Met ("yes") or not ("**no**"), naming what could not be judged: "yes (no LiteLLM)" without LiteLLM."""
        missing = [
            name for name, factor, other in self._relative(floor, litellm) if factor is not None and other is None
        ]
        word = "**no**" if self.shortfalls(value, floor, litellm) else "yes"
        return f"{word} (no {' or '.join(missing)})" if missing else word

    def shortfalls(
        self, value: float, floor: float | None, litellm: float | None, *, shown: str | None = None
    ) -> list[str]:
        """Each bound ``value`` misses, and by how much: "2.68 times the floor's (target at most 1.5 times)". A
        bound that cannot be judged (no floor or LiteLLM figure) is not a miss. ``shown``: the value as the table
        prints it ("< 50")."""
        sign = "≥" if self.higher_is_better else "≤"

        def ok(bound: float, *, slack: float = 0.0) -> bool:
            return value >= bound - slack if self.higher_is_better else value <= bound + slack

        missed = []
        if self.limit is not None and not ok(self.limit):
            unit = f" {self.unit}" if self.unit else ""
            missed.append(f"{shown or f'{value:,.1f}'}{unit} (target {sign} {self.limit:,.0f}{unit})")
        for name, factor, other in self._relative(floor, litellm):
            if factor is None or other is None:
                continue
            if not ok(other * factor, slack=self.floor_slack if name == "floor" else 0.0):
                ratio = _ratio_text(value / other, bound=factor) if other else "n/a"
                whose = "the floor's" if name == "floor" else f"{name}'s"
                missed.append(f"{ratio} {whose} (target {sign} {factor:g}{TIMES})")
        return missed

    def _relative(self, floor: float | None, litellm: float | None) -> list[tuple[str, float | None, float | None]]:
        """(name, factor of the goal, the other's figure) for the floor and LiteLLM."""
        return [("floor", self.floor, floor), ("LiteLLM", self.litellm, litellm)]


def _ratio_text(ratio: float, *, bound: float) -> str:
    """A ratio as a miss prints it: two decimals, or as many more as it takes not to show the very bound it missed
    (0.503, not 0.50, against a target of at most 0.5 times; 0.6996, not 0.700, against at least 0.7)."""
    digits = 2
    while float(f"{ratio:.{digits}f}") == bound and digits < 9:
        digits += 1
    return f"{ratio:.{digits}f}{TIMES}"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    digits: int
    goal: Goal | None = None
    why: str = ""  # printed under a miss: what CesaFlow does here that the floor does not (README "Performance")


# Why the gateway's figures trail the floor's: what every call does that the floor does not.
WHY_PER_CALL = (
    "every call writes its run row and its `key.used` audit row (one transaction, in a thread beside the provider "
    "call, on the same core as the first words), then its end and usage row (batched, after the last byte), mostly "
    "through Django's ORM in PostgreSQL, about a third of CesaFlow's CPU per call; it also counts its rate limits in "
    "Redis. The floor writes nothing and counts nothing"
)
WHY_PER_CHUNK = (
    "each chunk is decoded from the provider's SSE, parsed, translated to OpenAI's shape and encoded again, through "
    "the adapter's generators and a read watchdog; the floor passes the provider's bytes through"
)
WHY_PACED = (
    "50 paced streams take most of a core (every call's run, audit and end rows and its rate limits), so their starts "
    "queue behind each other"
)
WHY_PLAIN_API = "Django's request path and DRF's view, the org key's check and the rate limits' round trip to Redis"


METRICS = (
    Metric("cpu_ms_per_stream", "CPU per 10-token streamed request", "ms", 2, Goal(floor=1.5), WHY_PER_CALL),
    Metric(
        "seq_added_ttft_p50",
        "Added TTFT p50, sequential",
        "ms",
        2,
        Goal(floor=1.3, litellm=0.5, floor_slack=1),
        WHY_PER_CALL,
    ),
    Metric("seq_added_ttft_p95", "Added TTFT p95, sequential", "ms", 2),
    Metric(
        "seq_added_ttft_p99",
        "Added TTFT p99, sequential",
        "ms",
        2,
        Goal(floor=1.3, litellm=0.5, floor_slack=1),
        WHY_PER_CALL,
    ),
    Metric("seq_added_done_p50", "Added time to the last event ([DONE]) p50, sequential", "ms", 2),
    Metric(
        "load_added_ttft_p50",
        "Added TTFT p50, 50 paced streams",
        "ms",
        2,
        Goal(limit=8, unit="ms"),
        WHY_PACED,
    ),
    Metric("load_added_ttft_p95", "Added TTFT p95, 50 paced streams", "ms", 2),
    Metric(
        "load_added_ttft_p99",
        "Added TTFT p99, 50 paced streams",
        "ms",
        2,
        Goal(limit=30, unit="ms"),
        WHY_PACED,
    ),
    Metric("cpu_share_50_paced", "CPU of the process with 50 paced streams", "% of a core", 0),
    Metric(
        "paced_streams_cpu",
        "Paced streams per process, CPU-bound estimate (50 / CPU share)",
        "streams",
        0,
        Goal(limit=75, higher_is_better=True),
        WHY_PACED,
    ),
    Metric(
        "paced_streams_max",
        "Paced streams sustained, measured ladder",
        "streams",
        0,
        Goal(limit=75, higher_is_better=True),
        WHY_PACED,
    ),
    Metric(
        "saturation_streams_per_s",
        "Streams/s at saturation (100 tokens)",
        "/s",
        0,
        Goal(floor=0.7, litellm=4, higher_is_better=True),
        WHY_PER_CALL,
    ),
    Metric("saturation_chunks_per_s", "Chunks/s at saturation", "/s", 0),
    Metric(
        "one_stream_chunks_per_s",
        "Chunks/s on one 2,000-token stream",
        "/s",
        0,
        Goal(floor=0.7, higher_is_better=True),
        WHY_PER_CHUNK,
    ),
    Metric("cpu_us_per_chunk", "CPU per chunk, one unpaced stream", "µs", 0),
    Metric("rss_idle_mb", "RSS idle (after warm-up)", "MB", 1, Goal(limit=120, unit="MB")),
    Metric("rss_per_stream_kb", "RSS per open stream", "KB", 1, Goal(limit=100, unit="KB")),
    Metric("api_rps", "Plain API requests/s", "/s", 0, Goal(limit=250, higher_is_better=True), WHY_PLAIN_API),
    Metric("cpu_ms_per_api_request", "CPU per plain API request", "ms", 2),
    Metric("close_p50_ms", "Upstream closed after disconnect, p50", "ms", 1),
    Metric("close_max_ms", "Upstream closed after disconnect, max", "ms", 1, Goal(limit=100, unit="ms")),
)
# Figures LiteLLM has no counterpart for: its column says so instead of "n/a".
NOT_APPLICABLE = {LITELLM: {"api_rps": "no such endpoint", "cpu_ms_per_api_request": "no such endpoint"}}


def _format(figure: Figure | None, metric: Metric) -> str:
    if figure is None or figure.value is None or math.isnan(figure.value):
        return figure.note if figure is not None and figure.note else "n/a"
    return f"{figure.prefix}{figure.value:,.{metric.digits}f}"


def _value(figure: Figure | None) -> float | None:
    return None if figure is None or figure.value is None or math.isnan(figure.value) else figure.value


def _ratio(cf: Figure | None, other: Figure | None) -> str:
    top, bottom = _value(cf), _value(other)
    if top is None or bottom is None or bottom == 0:
        return "n/a"
    return f"{top / bottom:.2f}{TIMES}"


def markdown_table(figures: dict[str, dict[str, Figure]], *, unavailable: dict[str, str] | None = None) -> str:
    """Rows: metrics; columns: the four proxies and LiteLLM, then CesaFlow ÷ floor and CesaFlow ÷ LiteLLM per
    server (same run), the target and whether it is met per server ("daphne / uvicorn")."""
    unavailable = unavailable or {}
    head = (
        "| metric | CesaFlow daphne | CesaFlow uvicorn | floor daphne | floor uvicorn | LiteLLM "
        "| CesaFlow ÷ floor (d / u) | CesaFlow ÷ LiteLLM (d / u) | target | met? (d / u) |"
    )
    lines = [head, "|" + "---|" * 10]
    for metric in METRICS:
        by_target = figures.get(metric.key, {})
        cells = []
        for name in COLUMNS:
            figure = by_target.get(name)
            if figure is None and metric.key in NOT_APPLICABLE.get(name, {}):
                cells.append(f"n/a ({NOT_APPLICABLE[name][metric.key]})")
            elif _value(figure) is None and name in unavailable:
                cells.append("unavailable")
            else:
                cells.append(_format(figure, metric))
        vs_floor = " / ".join(_ratio(by_target.get(f"cesaflow-{s}"), by_target.get(f"floor-{s}")) for s in SERVERS)
        vs_litellm = " / ".join(_ratio(by_target.get(f"cesaflow-{s}"), by_target.get(LITELLM)) for s in SERVERS)
        met = []
        for server in SERVERS:
            cf = by_target.get(f"cesaflow-{server}")
            if metric.goal is None:
                met.append("—")
            elif _value(cf) is None or cf is None or cf.value is None:
                met.append("n/a")
            elif cf.prefix.startswith("≥") and metric.goal.higher_is_better:
                # "≥ N": the harness ran out before the proxy did, so a miss cannot be claimed.
                verdict = metric.goal.verdict(cf.value, _value(by_target.get(f"floor-{server}")), None)
                met.append("yes" if verdict.startswith("yes") else "inconclusive")
            else:
                floor, litellm = _value(by_target.get(f"floor-{server}")), _value(by_target.get(LITELLM))
                met.append(metric.goal.verdict(cf.value, floor, litellm))
        target = metric.goal.text() if metric.goal else "—"
        label = f"{metric.label} ({metric.unit})"
        lines.append(f"| {label} | {' | '.join(cells)} | {vs_floor} | {vs_litellm} | {target} | {' / '.join(met)} |")
    return "\n".join(lines)


RUN_STREAM_GOAL = Goal(limit=15, unit="ms")
TRANSPORT_LABELS = {
    "sse": "SSE (`GET /runs/<id>/events`)",
    "ws": "websocket (`/ws/runs/<id>/`)",
    "sse-create": "SSE created streaming (`POST /runs`, `stream: true`)",
}


def run_stream_table(
    figures: dict[str, dict[str, Figure]], *, executors: tuple[str, ...] = ("inline", "worker")
) -> str:
    """The run stream (daphne): first ``text.delta`` after the stream is opened, minus the simulator's TTFT."""
    lines = [
        "| run stream (daphne) | executor | first event p50 (ms) | first text.delta p50 / p95 (ms) "
        "| simulator TTFT p50 / p95 (ms) | added p50 / p95 (ms) | first event → text.delta p50 (ms) "
        "| of which until `running` p50 (ms) | target (added p50) | met? |",
        "|" + "---|" * 10,
    ]

    def ms(metric: str, name: str) -> str:
        figure = figures.get(metric, {}).get(name)
        return "n/a" if _value(figure) is None or figure is None else f"{figure.value:,.1f}"

    for executor in executors:
        direct = f"direct-{executor}"
        for transport, label in TRANSPORT_LABELS.items():
            name = f"{executor}-{transport}"
            added = _value(figures.get("run_added_p50", {}).get(name))
            met = "n/a" if added is None else RUN_STREAM_GOAL.verdict(added, None, None)
            lines.append(
                f"| {label} | {executor} | {ms('run_first_event_p50', name)} "
                f"| {ms('run_first_text_p50', name)} / {ms('run_first_text_p95', name)} "
                f"| {ms('run_direct_ttft_p50', direct)} / {ms('run_direct_ttft_p95', direct)} "
                f"| {ms('run_added_p50', name)} / {ms('run_added_p95', name)} "
                f"| {ms('run_event_to_text_p50', name)} | {ms('run_event_to_running_p50', name)} "
                f"| {RUN_STREAM_GOAL.text()} | {met} |"
            )
    return "\n".join(lines)


WHY_MISSED = (
    'Figures and what was tried: README.md, "Performance"; `make bench-profile` shows where a server\'s CPU goes on '
    "this machine."
)
# Why a run's first words come later than the simulator's: per executor.
WHY_RUN_STREAM = {
    "inline": (
        "the stream's attach is a transaction before the provider call (the org's row locked, its running slots "
        "counted, the run set running, its `key.used` row), and the events pass through the channel layer"
    ),
    "worker": (
        "two transactions in two processes (the web process's attach, then the worker's claim: the org's row locked, "
        "the run read, slots counted, the update, `key.used`) with two trips through Redis between them (the nudge "
        "to the worker, the events back)"
    ),
}


def _misses(figures: dict[str, dict[str, Figure]], *, run_stream: bool) -> list[tuple[str, str]]:
    """(line, why) for every target this run missed, per server (and per run stream)."""
    lines = []
    for metric in METRICS:
        if metric.goal is None:
            continue
        by_target = figures.get(metric.key, {})
        for server in SERVERS:
            cf = by_target.get(f"cesaflow-{server}")
            value = _value(cf)
            if cf is None or value is None or (cf.prefix.startswith("≥") and metric.goal.higher_is_better):
                continue
            floor, litellm = _value(by_target.get(f"floor-{server}")), _value(by_target.get(LITELLM))
            shortfalls = metric.goal.shortfalls(value, floor, litellm, shown=_format(cf, metric))
            if shortfalls:
                lines.append((f"- {metric.label}, {server}: {'; '.join(shortfalls)}", metric.why))
    if run_stream:
        for executor in ("inline", "worker"):
            for transport, label in TRANSPORT_LABELS.items():
                added = _value(figures.get("run_added_p50", {}).get(f"{executor}-{transport}"))
                shortfalls = [] if added is None else RUN_STREAM_GOAL.shortfalls(added, None, None)
                if shortfalls:
                    line = f"- first run `text.delta`, added p50, {executor}, {label}: {'; '.join(shortfalls)}"
                    lines.append((line, WHY_RUN_STREAM[executor]))
    return lines


def missed_targets(figures: dict[str, dict[str, Figure]], *, run_stream: bool) -> list[str]:
    """Every target this run missed, per server (and per run stream), with by how much: issue #13 asks the
    benchmark to say so for each target it does not meet. Figures the harness bounded ("≥ N") are not misses."""
    return [line for line, _ in _misses(figures, run_stream=run_stream)]


def missed_report(figures: dict[str, dict[str, Figure]], *, run_stream: bool) -> tuple[list[str], str]:
    """``missed_targets`` and the text printed after the tables: the misses grouped by their reason, each group
    followed by why (groups in the order of their first miss)."""
    misses = _misses(figures, run_stream=run_stream)
    if not misses:
        return [], "Every target met."
    groups: dict[str, list[str]] = {}
    for line, why in misses:
        groups.setdefault(why, []).append(line)
    text = ["Missed in this run, by how much, and why:"]
    for why, lines in groups.items():
        text.extend(lines)
        if why:
            text.append(f"  Why: {why}.")
    return [line for line, _ in misses], "\n".join([*text, WHY_MISSED])


def report_notes(
    figures: dict[str, dict[str, Figure]],
    *,
    unavailable: dict[str, str],
    litellm: dict[str, str],
    raw: dict[str, Any],
    errors: dict[str, dict[str, Any]],
) -> list[str]:
    """What is not measured and why, the simulator's own figures (what every "added" figure is relative to, and
    the harness's ceiling), and the errors of each phase."""

    def value(metric: str) -> str:
        figure = figures.get(metric, {}).get("direct")
        return "n/a" if figure is None or figure.value is None else f"{figure.value:,.1f}"

    notes = [f"- {name}: {reason}" for name, reason in unavailable.items()]
    notes.append(
        f"- simulator alone: TTFT p50/p99 sequential {value('seq_direct_ttft_p50')}/{value('seq_direct_ttft_p99')} ms, "
        f"under 50 paced streams {value('load_direct_ttft_p50')}/{value('load_direct_ttft_p99')} ms; "
        f"one stream {value('one_stream_chunks_per_s')} chunks/s; saturation {value('saturation_chunks_per_s')} "
        f"chunks/s; CPU with 50 paced streams {value('cpu_share_50_paced')} % of a core",
    )
    if litellm.get("install"):
        notes.append(f"- LiteLLM: {litellm['requirement']}, {litellm['install']}")
    limit = raw.get("capacity_harness_limit")
    if limit is not None:
        notes.append(f"- the harness (simulator + load generator on one core) fell behind at {limit} paced streams")
    for phase, by_target in errors.items():
        for name, entry in by_target.items():
            if entry["count"]:
                notes.append(f"- {phase} / {name}: {entry['count']} errors, e.g. {entry['examples'][:1]}")
    return notes


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
