"""The product in a real browser: sign up (following the link the server mails), add a provider key pointing at the
simulator, start a run and watch its answer stream in over the websocket, cancel a slow run (with the runs list
following live in a second tab), reload and see metadata only. No page may raise a CSP violation or a console error.

Headless Debian Chromium (never a downloaded browser) against daphne serving CesaFlow on the test database; the
runs execute in the server's inline executor and call the provider simulator of this test process.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(90)]

STREAM_TEXT = "Alpha, beta, gamma, delta, epsilon, zeta, eta, theta, iota, kappa."
SLOW_WORD = "tortoise "
RUN_URL = re.compile(r"/runs/[0-9a-f-]{36}/$")
CONFIRM_PATH = re.compile(r"/signup/confirm/[A-Za-z0-9_\-]+/")
# Reports CSP violations as console errors, which the test collects with every other console error.
CSP_REPORTER = """
document.addEventListener("securitypolicyviolation", (e) => {
  console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || "inline"}`);
});
"""


def _watch(page: Any, problems: list[str]) -> None:
    page.add_init_script(CSP_REPORTER)
    page.on(
        "console", lambda m: problems.append(f"{page.url}: console.{m.type}: {m.text}") if m.type == "error" else None
    )
    page.on("pageerror", lambda error: problems.append(f"{page.url}: uncaught {error}"))


def _start_run(page: Any, objective: str) -> str:
    """Fill the new-run form (the model from the key's list, filled in by runs-live.js) and land on the run page."""
    page.goto("/runs/new/")
    page.fill("#id_objective", objective)
    model_option = page.locator("select[name=model] option[value='fake-model']")
    model_option.wait_for(state="attached")
    page.select_option("select[name=model]", "fake-model")
    page.click("form[data-run-form] button[type=submit]")
    page.wait_for_url(RUN_URL)
    return str(page.url)


def _answer_states(page: Any, *, timeout: float = 15.0) -> list[str]:
    """Poll the answer pane until the run has ended; every distinct text it showed, in order."""
    states: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text, status = page.evaluate(
            """() => [document.querySelector("[data-run-answer]").textContent,
                      document.querySelector("[data-run-status]").textContent]"""
        )
        if text and (not states or states[-1] != text):
            states.append(text)
        if status in ("Succeeded", "Failed", "Cancelled"):
            return states
        time.sleep(0.015)
    raise AssertionError(f"The run did not end within {timeout} s; the pane showed {states!r}")


def _confirmation_path(server_log: Path, email: str, *, timeout: float = 5.0) -> str:
    """The confirmation link mailed to ``email``, read where a developer on ``make run`` reads it: the server's
    console (development without SMTP prints mail there). The server is a subprocess: its outbox is not ours."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server_log.read_text(errors="replace")
        start = log.rfind(f"To: {email}")
        match = CONFIRM_PATH.search(log, start) if start >= 0 else None
        if match:
            return match.group(0)
        time.sleep(0.1)
    raise AssertionError(f"No confirmation link for {email} on the server's console:\n{log[-2000:]}")


def _sign_up_with_a_simulator_key(page: Any, simulator: Any, server_log: Path) -> None:
    from playwright.sync_api import expect

    # Sign up: a new account with its own organization, confirmed by the link mailed to it.
    email = f"e2e-{secrets.token_hex(4)}@example.com"
    page.goto("/signup/")
    page.fill("#id_email", email)
    page.fill("#id_name", "Erin Tester")
    page.fill("#id_org_name", "Browser Org")
    password = f"pass-{secrets.token_urlsafe(12)}"
    page.fill("#id_password", password)
    page.click("form.stacked button[type=submit]")
    expect(page.locator("h1")).to_have_text("Check your inbox")
    page.goto(_confirmation_path(server_log, email))
    page.fill("#id_password", password)
    page.click("text=Confirm and sign in")
    page.wait_for_url(re.compile(r"/$"))
    expect(page.locator("h1")).to_have_text("Browser Org")

    # A provider key pointing at the simulator (an OpenAI-compatible server); it is checked on the spot.
    page.goto("/provider-keys/")
    page.select_option("#id_provider", "openai_compatible")
    page.fill("#id_label", "simulator")
    page.fill("#id_secret", f"sk-e2e-{secrets.token_urlsafe(24)}")
    page.fill("#id_base_url", simulator.base_urls["openai"])
    page.click("form.stacked button[type=submit]")
    expect(page.locator(".flash-success").first).to_contain_text("was added")


@pytest.mark.parametrize("asgi_server", ["inline", "worker"], indirect=True)
def test_a_fast_run_started_from_the_dashboard_shows_its_whole_answer(browser_page, simulator, tmp_path):
    """The answer of an instant run (the simulator's echo, no delay at all) used to be gone before the run page's
    websocket connected. Now the run starts when the page is attached, whichever executor runs it."""
    from playwright.sync_api import expect

    page = browser_page
    problems: list[str] = []
    _watch(page, problems)
    _sign_up_with_a_simulator_key(page, simulator, tmp_path / "daphne.log")
    for objective in ("Quick one", "And another"):
        _start_run(page, objective)
        expect(page.locator("[data-run-status]")).to_have_text("Succeeded")
        expect(page.locator("[data-run-answer]")).to_have_text(f"You asked: {objective}")
    assert problems == []


def test_sign_up_add_a_key_stream_a_run_cancel_a_slow_one_and_reload(browser_page, simulator, tmp_path):
    from playwright.sync_api import expect

    page = browser_page
    problems: list[str] = []
    _watch(page, problems)
    _sign_up_with_a_simulator_key(page, simulator, tmp_path / "daphne.log")

    # A run whose answer arrives in small pieces about 120 ms apart, after the page has connected.
    simulator.enqueue(
        "openai",
        {
            "name": "e2e-stream",
            "turns": [{"text": STREAM_TEXT}],
            "timing": {"first_token_ms": 700, "per_event_ms": 120},
            "stream_shape": {"text_chunk_chars": 7},
        },
    )
    _start_run(page, "Recite part of the Greek alphabet")
    expect(page.locator("[data-run-connection]")).to_have_text("Live")
    states = _answer_states(page)
    expect(page.locator("[data-run-status]")).to_have_text("Succeeded")
    assert states[-1] == STREAM_TEXT
    growing = [s for s in states if s]
    assert len(growing) >= 3, f"expected at least three separate text deltas, saw {states!r}"
    assert all(later.startswith(earlier) and later != earlier for earlier, later in itertools.pairwise(growing))
    expect(page.locator("[data-run-output-tokens]")).not_to_have_text("0")
    expect(page.locator("[data-run-elapsed]")).to_have_text(re.compile(r"^\d+ s$"))
    expect(page.locator("[data-run-cancel]")).to_be_hidden()

    # A slow run: cancel it while it streams; a second tab with the runs list follows the status live.
    simulator.enqueue(
        "openai",
        {
            "name": "e2e-slow",
            "turns": [{"text": SLOW_WORD * 200}],
            "timing": {"first_token_ms": 300, "per_event_ms": 150},
            "stream_shape": {"text_chunk_chars": len(SLOW_WORD)},
        },
    )
    run_url = _start_run(page, "Take your time")
    run_id = run_url.rstrip("/").rsplit("/", 1)[-1]
    expect(page.locator("[data-run-answer]")).to_contain_text(SLOW_WORD.strip())
    expect(page.locator("[data-run-status]")).to_have_text("Running")

    runs_list = page.context.new_page()
    _watch(runs_list, problems)
    runs_list.goto("/runs/")
    row_badge = runs_list.locator(f'tr[data-run-id="{run_id}"] [data-run-status]')
    expect(row_badge).to_have_text("Running")

    page.click("[data-run-cancel] button")
    expect(page.locator("[data-run-status]")).to_have_text("Cancelled", timeout=5_000)
    expect(page.locator("[data-run-error]")).to_have_text("The run was cancelled.")
    expect(row_badge).to_have_text("Cancelled", timeout=5_000)  # live, without a reload
    streamed = page.locator("[data-run-answer]").text_content() or ""
    assert SLOW_WORD * 2 in streamed
    assert len(streamed) < len(SLOW_WORD) * 200
    # The upstream call was stopped, not left to finish in the background.
    simulator.wait_for(lambda r: r.get("scenario") == "e2e-slow" and r.get("client_closed") is True, timeout=5.0)

    # Reload: metadata only, and it says why.
    page.reload()
    expect(page.locator("[data-run-status]")).to_have_text("Cancelled")
    expect(page.locator("[data-run-not-stored]")).to_contain_text("Responses are not stored")
    expect(page.locator("[data-run-answer]")).to_have_count(0)
    expect(page.locator(".run-objective-full")).to_have_text("Take your time")
    assert SLOW_WORD * 2 not in page.content()
    expect(page.locator("[data-run-error]")).to_have_text("The run was cancelled.")

    # The usage page has the first run's tokens and renders its chart without JavaScript help.
    page.goto("/usage/")
    expect(page.locator("svg.chart")).to_be_visible()
    expect(page.locator("[data-token-cap]")).to_contain_text("No cap is set")

    runs_list.close()
    assert problems == []


def test_an_agent_run_builds_a_package_live_and_its_workspace_downloads_once(browser_page, simulator, tmp_path):
    """The newcomer's agent demo: files appear, the test command's output scrolls by, the run succeeds, the zip
    downloads, and afterwards the workspace is gone."""
    from playwright.sync_api import expect

    page = browser_page
    problems: list[str] = []
    _watch(page, problems)
    _sign_up_with_a_simulator_key(page, simulator, tmp_path / "daphne.log")

    page.goto("/runs/new/")
    page.select_option("#id_kind", "agent")
    page.fill("#id_objective", "Write a greeting package with a test, and run it")
    page.fill("#id_custom_model", "fake/agent_demo")
    page.click("form[data-run-form] button[type=submit]")
    page.wait_for_url(RUN_URL)

    expect(page.locator("[data-agent-files]")).to_contain_text("greeting/__init__.py")
    expect(page.locator("[data-agent-timeline]")).to_contain_text("run_command python3 -m unittest")
    expect(page.locator("[data-agent-terminal]")).to_contain_text("OK")
    expect(page.locator("[data-run-status]")).to_have_text("Succeeded")
    expect(page.locator("[data-agent-timeline]")).to_contain_text("✓ exit 0")
    expect(page.locator("[data-agent-step]")).to_contain_text("Step 5 of 40")
    expect(page.locator("[data-workspace-download]")).to_be_visible()

    with page.expect_download() as download_info:
        page.click("[data-workspace-download]")
    saved = tmp_path / "workspace.zip"
    download_info.value.save_as(saved)
    with zipfile.ZipFile(saved) as archive:
        assert "tests/test_greeting.py" in archive.namelist()
        assert "Hello, " in archive.read("greeting/__init__.py").decode()

    page.reload()
    expect(page.locator("[data-agent]")).to_contain_text("The workspace was downloaded and deleted.")
    expect(page.locator("[data-workspace-download]")).to_be_hidden()
    assert problems == []
