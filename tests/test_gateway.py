"""The gateway's lean path (``cesaflow.gateway``): the OpenAI-compatible endpoint skips the middleware it never
uses and keeps the headers every response needs; everything else keeps Django's full chain, its header middleware
called on the event loop (``PageASGIHandler``)."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from typing import Any

import pytest
from channels.testing import HttpCommunicator
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, RequestAborted
from django.core.handlers.asgi import ASGIRequest
from django.http.response import HttpResponseBase

from cesaflow.asgi import application
from cesaflow.gateway import GATEWAY_MIDDLEWARE, GatewayASGIHandler, PageASGIHandler
from cesaflow.lib.hops import RequestThreads
from tests.runs.test_execution_support import async_isolation  # noqa: F401 - a fixture, used below
from tests.signin import cookie_header, session_cookies_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("async_isolation")]


def test_the_gateway_chain_is_an_ordered_subset_of_the_project_middleware():
    positions = [settings.MIDDLEWARE.index(path) for path in GATEWAY_MIDDLEWARE]
    assert positions == sorted(positions)
    skipped = set(settings.MIDDLEWARE) - set(GATEWAY_MIDDLEWARE)
    assert {
        "orgs.sessions.middleware.SessionTokenMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.LoginRequiredMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
    } <= skipped


async def _get(path: str, headers: list[tuple[bytes, bytes]], app: Any = application) -> dict[str, Any]:
    communicator = HttpCommunicator(app, "GET", path, headers=[(b"host", b"testserver"), *headers])
    try:
        response: dict[str, Any] = await communicator.get_response(timeout=5)
        return response
    finally:
        await communicator.wait()


async def test_gateway_responses_carry_the_security_headers_and_no_session_machinery(cast):
    response = await _get("/api/v1/models", [(b"authorization", f"Bearer {cast.dev_a.api_secret}".encode())])
    assert response["status"] == 200
    headers = {name.decode().lower(): value.decode() for name, value in response["headers"]}
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-xss-protection"] == "0"
    assert headers["cache-control"] == "no-store"
    assert headers["x-frame-options"] == "DENY"
    assert "content-security-policy" in headers
    assert "cookie" not in headers.get("vary", "").lower()  # nothing here depends on a session
    assert "set-cookie" not in headers
    assert json.loads(response["body"])["object"] == "list"


async def test_a_dashboard_session_opens_nothing_on_the_gateway(cast):
    from asgiref.sync import sync_to_async

    cookies = await sync_to_async(session_cookies_for)(cast.dev_a.user)
    response = await _get("/api/v1/models", [cookie_header(cookies)])
    assert response["status"] == 401
    assert json.loads(response["body"])["error"]["code"] == "missing_api_key"
    # The same session works on the rest of the API, which keeps the full chain.
    org = await _get("/api/v1/org", [cookie_header(cookies)])
    assert org["status"] == 200


async def test_the_gateway_runs_its_middleware_and_the_request_signals_on_the_event_loop(cast, monkeypatch):
    """No thread hop outside the view's database work: Django's MiddlewareMixin hooks and the request signals'
    receivers run in the loop's own thread (under Django's handler each was a trip to another thread)."""
    import threading

    from django.core import signals
    from django.middleware.clickjacking import XFrameOptionsMiddleware
    from django.middleware.security import SecurityMiddleware

    threads: dict[str, int] = {}

    def spy(name: str, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            threads[name] = threading.get_ident()
            return original(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(SecurityMiddleware, "process_request", spy("security", SecurityMiddleware.process_request))
    frame = spy("x-frame", XFrameOptionsMiddleware.process_response)
    monkeypatch.setattr(XFrameOptionsMiddleware, "process_response", frame)

    def started(**kwargs: Any) -> None:
        threads["started"] = threading.get_ident()

    def finished(**kwargs: Any) -> None:
        threads["finished"] = threading.get_ident()

    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    try:
        key = [(b"authorization", f"Bearer {cast.dev_a.api_secret}".encode())]
        response = await _get("/api/v1/models", key, GatewayASGIHandler())  # its chain built with the spies
    finally:
        signals.request_started.disconnect(started)
        signals.request_finished.disconnect(finished)
    assert response["status"] == 200
    assert response_header(response, "x-frame-options") == "DENY"
    assert threads == dict.fromkeys(("security", "x-frame", "started", "finished"), threading.get_ident())


def response_header(response: dict[str, Any], name: str) -> str:
    headers: dict[str, str] = {key.decode().lower(): value.decode() for key, value in response["headers"]}
    return headers[name]


def test_middleware_that_would_need_a_thread_hop_or_view_hooks_cannot_join_the_gateway():
    class SyncOnly(GatewayASGIHandler):
        middleware_paths = ("django.contrib.messages.middleware.MessageMiddleware",)  # process_response, sync too

    class WithViewHooks(GatewayASGIHandler):
        middleware_paths = ("django.middleware.csrf.CsrfViewMiddleware",)

    with pytest.raises(ImproperlyConfigured, match="process_"):
        WithViewHooks()
    SyncOnly()  # MessageMiddleware is async-capable and hook-free: allowed (it just is not needed)

    class NotAsync(GatewayASGIHandler):
        middleware_paths = ("tests.test_gateway.SyncOnlyMiddleware",)

    with pytest.raises(ImproperlyConfigured, match="async-capable"):
        NotAsync()


class SyncOnlyMiddleware:
    sync_capable = True
    async_capable = False

    def __init__(self, get_response: object) -> None:
        self.get_response = get_response


# --- Every other request: Django's full chain, header middleware on the loop ------------------------------------


async def test_pages_run_their_header_middleware_on_the_loop_and_the_view_with_its_hooks_in_one_hop(cast, monkeypatch):
    """Under Django's handler each hook of a ``MiddlewareMixin`` was a thread hop (thirteen a request), and the view,
    its ``process_view`` hooks, DRF's rendering and ``request_started`` one each (six). The header middleware and
    ``request_started`` now run in the loop's own thread, where I/O would block the server (so only hooks without
    any are listed in ``ON_THE_LOOP``); the view-level work shares one hop in the request's thread; the response
    is closed (``request_finished``, which hands the view's database connection back) in that thread too."""
    import threading

    from asgiref.sync import SyncToAsync
    from django.contrib.messages.middleware import MessageMiddleware
    from django.core import signals
    from django.middleware.common import CommonMiddleware
    from django.middleware.csrf import CsrfViewMiddleware
    from django.middleware.security import SecurityMiddleware
    from rest_framework.response import Response

    from orgs.api.views import OrganizationView

    threads: dict[str, int] = {}

    def spy(cls: type, hook: str) -> None:
        original = getattr(cls, hook)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            threads[f"{cls.__name__}.{hook}"] = threading.get_ident()
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, hook, wrapper)

    for cls, hook in (
        (SecurityMiddleware, "process_request"),
        (CommonMiddleware, "process_response"),
        (CsrfViewMiddleware, "process_response"),
        (MessageMiddleware, "process_response"),
        (CsrfViewMiddleware, "process_view"),
        (OrganizationView, "get"),
        (Response, "render"),
    ):
        spy(cls, hook)
    hops = 0
    original_call = SyncToAsync.__call__

    async def counted(self: SyncToAsync[Any, Any], *args: Any, **kwargs: Any) -> Any:
        nonlocal hops
        hops += 1
        return await original_call(self, *args, **kwargs)

    monkeypatch.setattr(SyncToAsync, "__call__", counted)

    def started(**kwargs: Any) -> None:
        threads["started"] = threading.get_ident()

    def finished(**kwargs: Any) -> None:
        threads["finished"] = threading.get_ident()

    key = [(b"x-api-key", cast.dev_a.api_secret.encode())]
    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    try:
        response = await _get("/api/v1/org", key, PageASGIHandler())  # its chain built with the spies
    finally:
        signals.request_started.disconnect(started)
        signals.request_finished.disconnect(finished)
    assert response["status"] == 200
    assert json.loads(response["body"])["id"] == str(cast.org_a.id)
    assert response_header(response, "x-frame-options") == "DENY"
    loop_thread = threading.get_ident()
    on_the_loop: tuple[str, ...] = ("SecurityMiddleware.process_request", "CommonMiddleware.process_response")
    on_the_loop += ("CsrfViewMiddleware.process_response", "MessageMiddleware.process_response", "started")
    in_its_thread = ("CsrfViewMiddleware.process_view", "OrganizationView.get", "Response.render", "finished")
    assert set(threads) == {*on_the_loop, *in_its_thread}
    assert {threads[name] for name in on_the_loop} == {loop_thread}
    assert len({threads[name] for name in in_its_thread}) == 1
    assert threads["OrganizationView.get"] != loop_thread
    assert hops == 2  # the view with its hooks and rendering; the response's closing


async def test_a_pages_thread_is_kept_for_the_next_request_and_never_shared_by_two_at_once(cast, monkeypatch):
    """Django started a thread for each request (and another to join it): 0.47 ms of CPU a request. The request's
    thread now comes from a pool (``cesaflow.lib.hops.RequestThreads``): one request after another reuse it, two at
    once each have their own (here they must meet inside their views, which they could not do in one thread)."""
    import threading

    from orgs.api.views import OrganizationView

    original = OrganizationView.get
    threads: list[threading.Thread] = []
    together = threading.Barrier(2, timeout=5)
    meet = False

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        if meet:
            together.wait()  # both views at once, or a BrokenBarrierError (a 500)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OrganizationView, "get", spy)
    key = [(b"x-api-key", cast.dev_a.api_secret.encode())]
    handler = PageASGIHandler()
    # A thread comes back once its request's work has run, a moment after the answer: the next request may come
    # sooner and take another (``RequestThreads.give_back``), so a few serve in turn, never one per request.
    for _ in range(20):
        assert (await _get("/api/v1/org", key, handler))["status"] == 200
    assert len({id(thread) for thread in threads}) <= 3, "a thread per request"
    assert all(thread.name.startswith("request") for thread in threads)
    meet = True
    both = await asyncio.gather(_get("/api/v1/org", key, handler), _get("/api/v1/org", key, handler))
    assert [answer["status"] for answer in both] == [200, 200]
    assert threads[-1] is not threads[-2]


def test_a_request_thread_goes_back_without_a_database_connection():
    # The next request must find its thread as a fresh one: a connection left open (the server may have ended it
    # since) would be used without any check.
    from django.db import connections

    pool = RequestThreads(keep=1)
    executor = pool.borrow()
    executor.submit(lambda: connections["default"].ensure_connection()).result(timeout=5)  # that thread's own
    assert executor.submit(lambda: connections["default"].connection).result(timeout=5) is not None
    pool.give_back(executor)
    assert executor.submit(lambda: connections["default"].connection).result(timeout=5) is None
    assert pool.borrow() is executor
    executor.shutdown()


def test_a_request_thread_still_busy_is_lent_again_only_once_its_work_is_done():
    # A view whose request was cancelled (its client left) runs on to its end in its thread.
    pool = RequestThreads(keep=1)
    busy = pool.borrow()
    release = threading.Event()
    busy.submit(release.wait)
    pool.give_back(busy)
    other = pool.borrow()
    assert other is not busy
    release.set()
    busy.submit(lambda: None).result(timeout=5)  # everything queued before it has run: the executor is idle again
    assert pool.borrow() is busy
    pool.give_back(busy)
    busy.submit(lambda: None).result(timeout=5)  # kept: ``keep`` is one
    pool.give_back(other)  # one more than ``keep``: shut down once idle
    deadline = time.monotonic() + 5
    while True:
        try:
            other.submit(lambda: None).result(timeout=5)
        except RuntimeError:  # "cannot schedule new futures after shutdown"
            break
        assert time.monotonic() < deadline, "an executor beyond keep was not shut down"
        time.sleep(0.01)
    assert pool.borrow() is busy
    busy.shutdown()


async def test_pages_keep_what_their_middleware_does(cast):
    login = await _get("/login/", [])
    assert login["status"] == 200
    assert "set-cookie" in {name.decode().lower() for name, _ in login["headers"]}  # the CSRF cookie
    assert response_header(login, "x-content-type-options") == "nosniff"
    assert "content-security-policy" in {name.decode().lower() for name, _ in login["headers"]}
    slashless = await _get("/login", [])
    assert (slashless["status"], response_header(slashless, "location")) == (301, "/login/")  # APPEND_SLASH
    # Deny by default (LoginRequiredMiddleware, a view hook): a dashboard page without a session goes to sign-in.
    sessions = await _get("/account/sessions/", [])
    assert sessions["status"] == 302
    assert response_header(sessions, "location").startswith("/login/")


async def test_the_one_hop_serves_async_views_and_errors_as_djangos_path_did(cast, settings, monkeypatch):
    """The view's hop is Django's sync ``_get_response``: an async view (``/metrics``) is run from it on the loop,
    and a view's exception goes through the exception middleware to the 500 handler, in the API's error shape."""
    from orgs.api.views import OrganizationView

    settings.METRICS_TOKEN = "m" * 40
    metrics = await _get("/metrics", [(b"authorization", b"Bearer " + b"m" * 40)])
    assert metrics["status"] == 200
    assert b"cesaflow_" in metrics["body"]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("broken view")

    monkeypatch.setattr(OrganizationView, "get", broken)
    response = await _get("/api/v1/org", [(b"x-api-key", cast.dev_a.api_secret.encode())])
    assert response["status"] == 500
    assert json.loads(response["body"])["error"]["code"] == "server_error"
    assert response_header(response, "x-content-type-options") == "nosniff"  # the header middleware still applied


def test_the_page_handler_refuses_middleware_that_cannot_run_both_ways(settings):
    settings.MIDDLEWARE = [*settings.MIDDLEWARE, "tests.test_gateway.SyncOnlyMiddleware"]
    handler = PageASGIHandler.__new__(PageASGIHandler)
    with pytest.raises(ImproperlyConfigured, match="sync- and async-capable"):
        handler.load_middleware(is_async=True)


async def _served_as_a_server_would(path: str, headers: list[tuple[bytes, bytes]]) -> list[dict[str, Any]]:
    """One request through the application, with the disconnect daphne and uvicorn report once the answer's last
    byte is sent (queued from within that ``send``, as theirs is)."""
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    incoming.put_nowait({"type": "http.request", "body": b"", "more_body": False})
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            incoming.put_nowait({"type": "http.disconnect"})

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    await asyncio.wait_for(application(scope, incoming.get, send), timeout=10)
    return sent


async def test_a_gateway_request_leaves_nothing_to_the_cyclic_collector(cast):
    """Once answered, a gateway request's objects (the request, its response, the disconnect that ends it) are
    freed as the handler lets go of them, not left in a reference cycle for the collector: that garbage made the
    collections that pause every request in flight more frequent and longer (issue #13, README "Performance").
    (Pages keep cycles of their own making: DRF's view and response hold each other, as do Django's request and its
    messages' storage.)"""
    auth = [(b"x-api-key", cast.dev_a.api_secret.encode())]
    path = "/api/v1/models"
    await _served_as_a_server_would(path, auth)  # warm: what the first request builds for good is not its garbage
    gc.collect()
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds unreachable lands in gc.garbage, kept for inspection
    try:
        sent = await _served_as_a_server_would(path, auth)
        gc.collect()
        # By type, not isinstance: a lazy object among the garbage (CSP's nonce) would be evaluated by isinstance.
        kept = (ASGIRequest, HttpResponseBase, RequestAborted)
        left = [kind.__name__ for kind in map(type, gc.garbage) if issubclass(kind, kept)]
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()
    assert sent[0]["status"] == 200
    assert left == []
