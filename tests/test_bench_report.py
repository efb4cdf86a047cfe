"""``make bench`` says, for every target a run misses, by how much (issue #13: "or says honestly by how much each is
missed"): ``bench.report.missed_targets`` from the figures of one run."""

from __future__ import annotations

from bench.report import (
    TIMES,
    WHY_MISSED,
    WHY_PER_CALL,
    WHY_RUN_STREAM,
    Figure,
    Goal,
    missed_report,
    missed_targets,
)

X = TIMES  # the multiplication sign the report prints


def test_a_goal_names_each_bound_it_misses_and_by_how_much():
    goal = Goal(floor=1.3, litellm=0.5)
    assert goal.shortfalls(26.0, 10.0, 40.0) == [
        f"2.60{X} the floor's (target ≤ 1.3{X})",
        f"0.65{X} LiteLLM's (target ≤ 0.5{X})",
    ]
    assert goal.shortfalls(12.0, 10.0, 40.0) == []
    assert goal.shortfalls(26.0, 10.0, None) == [f"2.60{X} the floor's (target ≤ 1.3{X})"]  # unmeasured is no miss
    assert goal.verdict(12.0, 10.0, None) == "yes (no LiteLLM)"
    assert goal.verdict(26.0, 10.0, None) == "**no** (no LiteLLM)"
    wanted_more = Goal(limit=250, higher_is_better=True, unit="/s")
    assert wanted_more.shortfalls(200.0, None, None) == ["200.0 /s (target ≥ 250 /s)"]
    assert wanted_more.shortfalls(300.0, None, None) == []
    # A miss never prints as the bound it missed.
    assert goal.shortfalls(10.0, 1.0, 19.9) == [
        f"10.00{X} the floor's (target ≤ 1.3{X})",
        f"0.503{X} LiteLLM's (target ≤ 0.5{X})",
    ]
    at_least = Goal(floor=0.7, higher_is_better=True)
    assert at_least.shortfalls(0.6996, 1.0, None) == [f"0.6996{X} the floor's (target ≥ 0.7{X})"]
    near_zero = Goal(floor=1.3, floor_slack=1)  # within 1 of the floor's counts as within its factor
    assert near_zero.shortfalls(1.2, 0.2, None) == []
    assert near_zero.shortfalls(1.5, 0.2, None) != []


def test_the_run_lists_every_miss_per_server_and_run_stream_and_nothing_it_met_or_could_not_judge():
    figures = {
        "cpu_ms_per_stream": {
            "cesaflow-daphne": Figure(9.9),
            "cesaflow-uvicorn": Figure(4.0),
            "floor-daphne": Figure(3.7),
            "floor-uvicorn": Figure(3.0),
        },
        # "≥ N": the harness ran out before the proxy did; no miss can be claimed.
        "paced_streams_max": {"cesaflow-daphne": Figure(40, prefix="≥ "), "cesaflow-uvicorn": Figure(50, prefix="< ")},
        "rss_idle_mb": {"cesaflow-daphne": Figure(130.0), "cesaflow-uvicorn": Figure(111.0)},
        "run_added_p50": {"inline-sse": Figure(13.0), "worker-ws": Figure(22.8)},
    }
    assert missed_targets(figures, run_stream=True) == [
        f"- CPU per 10-token streamed request, daphne: 2.68{X} the floor's (target ≤ 1.5{X})",
        "- Paced streams sustained, measured ladder, uvicorn: < 50 (target ≥ 75)",  # as the table prints it
        "- RSS idle (after warm-up), daphne: 130.0 MB (target ≤ 120 MB)",
        "- first run `text.delta`, added p50, worker, websocket (`/ws/runs/<id>/`): 22.8 ms (target ≤ 15 ms)",
    ]
    assert missed_targets(figures, run_stream=False)[-1].startswith("- RSS idle")


def test_the_printed_report_says_so_when_every_target_is_met_and_points_to_the_reasons_when_not():
    assert missed_report({}, run_stream=True) == ([], "Every target met.")
    figures = {"rss_idle_mb": {"cesaflow-daphne": Figure(130.0)}}
    missed, text = missed_report(figures, run_stream=False)
    assert text.splitlines() == ["Missed in this run, by how much, and why:", *missed, WHY_MISSED]
    assert missed == ["- RSS idle (after warm-up), daphne: 130.0 MB (target ≤ 120 MB)"]


def test_the_printed_report_says_why_once_after_each_group_of_misses_with_the_same_reason():
    figures = {
        "cpu_ms_per_stream": {
            "cesaflow-daphne": Figure(9.9),
            "cesaflow-uvicorn": Figure(8.7),
            "floor-daphne": Figure(3.7),
            "floor-uvicorn": Figure(3.0),
        },
        "rss_idle_mb": {"cesaflow-daphne": Figure(130.0)},  # no reason given: listed, no "Why"
        "saturation_streams_per_s": {"cesaflow-daphne": Figure(50.0), "floor-daphne": Figure(139.0)},
        "run_added_p50": {"inline-sse": Figure(13.0), "worker-sse": Figure(21.2), "worker-ws": Figure(22.8)},
    }
    missed, text = missed_report(figures, run_stream=True)
    assert missed == missed_targets(figures, run_stream=True)
    assert text.splitlines() == [
        "Missed in this run, by how much, and why:",
        f"- CPU per 10-token streamed request, daphne: 2.68{X} the floor's (target ≤ 1.5{X})",
        f"- CPU per 10-token streamed request, uvicorn: 2.90{X} the floor's (target ≤ 1.5{X})",
        f"- Streams/s at saturation (100 tokens), daphne: 0.36{X} the floor's (target ≥ 0.7{X})",
        f"  Why: {WHY_PER_CALL}.",
        "- RSS idle (after warm-up), daphne: 130.0 MB (target ≤ 120 MB)",
        "- first run `text.delta`, added p50, worker, SSE (`GET /runs/<id>/events`): 21.2 ms (target ≤ 15 ms)",
        "- first run `text.delta`, added p50, worker, websocket (`/ws/runs/<id>/`): 22.8 ms (target ≤ 15 ms)",
        f"  Why: {WHY_RUN_STREAM['worker']}.",
        WHY_MISSED,
    ]
