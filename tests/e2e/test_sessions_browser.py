"""Sessions in a real browser (issue #11): sign in, watch a live run, sign out everywhere from a second browser
(another cookie jar), and see the first page's stream end at once and its next navigation land on the login page.

Headless Debian Chromium against daphne on the test database (tests/e2e/conftest.py); the run streams from the
provider simulator of this test process, slowly enough to still be running when the session ends.
"""

from __future__ import annotations

import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from orgs.models import User
from orgs.services import organization_create
from runs.models import Run, RunStatus
from tests.runs.test_execution_support import make_run, sim_key

# real_hasher: the server (another process) verifies the password with the production hashers.
pytestmark = [pytest.mark.browser, pytest.mark.timeout(90), pytest.mark.real_hasher]

PASSWORD = "a long enough passphrase 93"
SLOW_WORD = "snail "


def _sign_in(page, email: str) -> None:
    from playwright.sync_api import expect

    page.goto("/login/")
    page.fill("#id_email", email)
    page.fill("#id_password", PASSWORD)
    page.click("form.stacked button[type=submit]")
    expect(page.locator("h1")).to_have_text("Session Org")


@pytest.fixture
def live_run(transactional_db, simulator) -> Run:
    """Set up before the browser starts: Playwright's sync API runs an event loop, and Django's ORM refuses to run
    in a thread that has one."""
    user = User.objects.create_user(email="sam@session.example", password=PASSWORD, name="Sam")
    org = organization_create(name="Session Org", admin=user)
    key = sim_key(org, user, simulator)
    simulator.enqueue(
        "openai",
        {
            "name": "e2e-session-slow",
            "turns": [{"text": SLOW_WORD * 300}],
            "timing": {"first_token_ms": 200, "per_event_ms": 100},
            "stream_shape": {"text_chunk_chars": len(SLOW_WORD)},
        },
    )
    return make_run(SimpleNamespace(user=user), key, objective="Keep streaming", watch=True)


def _status_of(run_id: uuid.UUID) -> str:
    with ThreadPoolExecutor(max_workers=1) as pool:  # outside Playwright's event loop thread
        return str(pool.submit(lambda: Run.objects.get(pk=run_id).status).result())


def test_signing_out_everywhere_ends_another_browsers_live_stream_and_its_next_page(live_run, browser_page):
    from playwright.sync_api import expect

    first = browser_page
    _sign_in(first, "sam@session.example")
    first.goto(f"/runs/{live_run.id}/")
    expect(first.locator("[data-run-status]")).to_have_text("Running")
    expect(first.locator("[data-run-answer]")).to_contain_text(SLOW_WORD.strip())
    expect(first.locator("[data-run-connection]")).to_have_text("Live")

    second = first.context.browser.new_context(base_url=first.url.split("/runs/")[0]).new_page()
    _sign_in(second, "sam@session.example")
    second.goto("/account/sessions/")
    expect(second.locator("[data-testid=sessions] tbody tr")).to_have_count(2)
    second.click("text=Sign out everywhere")
    second.wait_for_url(re.compile(r"/login/"))

    # The first browser's live stream ends within seconds, and says why.
    expect(first.locator("[data-run-connection]")).to_have_text(
        "You are signed out. Reload the page to sign in again.", timeout=5_000
    )
    streamed = len(first.locator("[data-run-answer]").text_content() or "")
    first.wait_for_timeout(600)
    assert len(first.locator("[data-run-answer]").text_content() or "") == streamed  # nothing more arrives
    # Its next navigation lands on the login page.
    first.goto("/runs/")
    assert re.search(r"/login/\?next=", first.url), first.url
    # The run itself went on: a watcher's sign-out never stops it.
    assert _status_of(live_run.id) in {RunStatus.RUNNING, RunStatus.SUCCEEDED}
