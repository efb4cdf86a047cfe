"""Revocation reaches open streams (issue #11 point 4): websockets and SSE re-check their credentials on every
revocation signal and on a timer, and close (4401 credentials gone, 4403 rights gone) or end within seconds.
The run they watch goes on. Real ASGI application, real channel layer (Redis), real session store."""

from __future__ import annotations

import time

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.db import OperationalError
from django.test import AsyncClient
from django.utils import timezone

from cesaflow.lib import row_cache
from cesaflow.lib.channel_layer import RedisChannelLayer
from orgs import revocation
from orgs.authentication import (
    CachedVerdict,
    KeyPrincipal,
    SessionPrincipal,
    api_key_verify,
    org_context_for,
    revalidate_cached,
)
from orgs.models import ApiKey, Membership
from orgs.services import api_key_revoke, membership_change_role, membership_remove
from orgs.sessions.services import sessions_revoke_all
from orgs.sessions.store import session_store
from runs import consumers, events
from runs.models import Run, RunStatus
from runs.watching import awatch_start, subscribe
from tests.runs.test_consumers import ORIGIN, close_code, key_headers, open_run_socket, session_headers, socket
from tests.runs.test_execution_support import (
    amake_run,
    asim_key,
    async_isolation,  # noqa: F401 - a fixture, used below
)
from tests.runs.test_sse import body, url
from tests.signin import cookie_header, record_for, session_cookies_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("async_isolation")]

# A signal closes a stream at once; these bounds only keep a broken build from hanging.
SIGNAL_BOUND_S = 5.0


@pytest.fixture(autouse=True)
def _runs_wait_for_the_test(settings):
    settings.RUN_EXECUTOR = "worker"  # the watched run stays queued: only the watcher's fate is under test


@pytest.fixture
async def queued_run(cast, simulator) -> Run:
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    return await amake_run(cast.admin_a, key, objective="Watch me.")


async def sign_out_everywhere(user) -> None:
    await sync_to_async(sessions_revoke_all)(user=user, actor=user, reason="signed_out_everywhere")


async def closed_with(communicator, timeout: float = SIGNAL_BOUND_S) -> int:
    """The close code of an open socket, waiting up to ``timeout`` (other frames in between are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        output = await communicator.receive_output(timeout=max(0.1, deadline - time.monotonic()))
        if output["type"] == "websocket.close":
            return int(output["code"])


async def assert_still_open(communicator, for_s: float = 0.5) -> None:
    assert await communicator.receive_nothing(timeout=for_s)


async def test_revoking_the_api_key_closes_its_sockets_4401_and_the_run_goes_on(cast, queued_run):
    headers = key_headers(cast.dev_a.api_secret)
    run_socket, _ = await open_run_socket(f"/ws/runs/{queued_run.id}/", headers)
    org_socket = socket("/ws/org/runs/", headers)
    assert (await org_socket.connect(timeout=3))[0]
    await assert_still_open(run_socket)
    await sync_to_async(api_key_revoke)(api_key=cast.dev_a.api_key, actor=cast.admin_a.user)
    assert await closed_with(run_socket) == 4401
    assert await closed_with(org_socket) == 4401
    run = await Run.objects.aget(pk=queued_run.pk)
    assert run.status == RunStatus.QUEUED  # a watcher's revocation never stops the run
    # New connections are refused too.
    assert await close_code(socket(f"/ws/runs/{queued_run.id}/", headers)) == 4401


async def test_another_orgs_revocation_leaves_the_socket_open(cast, queued_run):
    communicator, _ = await open_run_socket(f"/ws/runs/{queued_run.id}/", key_headers(cast.dev_a.api_secret))
    await sync_to_async(api_key_revoke)(api_key=cast.dev_b.api_key, actor=cast.admin_b.user)
    await assert_still_open(communicator, 1.0)
    await communicator.disconnect()


async def test_removing_the_member_closes_their_session_socket_4403(cast, queued_run):
    communicator, _ = await open_run_socket(f"/ws/runs/{queued_run.id}/", await session_headers(cast.dev_a.user))
    await assert_still_open(communicator)
    membership = await Membership.objects.aget(user=cast.dev_a.user, org=cast.org_a)
    await sync_to_async(membership_remove)(membership=membership, actor=cast.admin_a.user)
    assert await closed_with(communicator) == 4403


async def test_a_role_change_that_keeps_runs_read_keeps_the_socket_open(cast, queued_run):
    communicator, _ = await open_run_socket(f"/ws/runs/{queued_run.id}/", await session_headers(cast.dev_a.user))
    membership = await Membership.objects.aget(user=cast.dev_a.user, org=cast.org_a)
    await sync_to_async(membership_change_role)(membership=membership, role="admin", actor=cast.admin_a.user)
    await assert_still_open(communicator, 1.0)  # re-checked on the signal, and still allowed
    await communicator.disconnect()


async def test_signing_out_everywhere_closes_every_session_socket_4401(cast, queued_run):
    first = await session_headers(cast.dev_a.user)
    second = await session_headers(cast.dev_a.user)
    a, _ = await open_run_socket(f"/ws/runs/{queued_run.id}/", first)
    b = socket("/ws/org/runs/", second)
    assert (await b.connect(timeout=3))[0]
    other_user, _ = await open_run_socket(f"/ws/runs/{queued_run.id}/", await session_headers(cast.admin_a.user))
    await sync_to_async(sessions_revoke_all)(
        user=cast.dev_a.user, actor=cast.dev_a.user, reason="signed_out_everywhere"
    )
    assert await closed_with(a) == 4401
    assert await closed_with(b) == 4401
    await assert_still_open(other_user)
    await other_user.disconnect()


async def test_a_session_that_ends_without_a_signal_is_caught_by_the_timer(cast, queued_run, settings):
    settings.STREAM_REVALIDATE_SECONDS = 1
    cookies = await sync_to_async(session_cookies_for)(cast.dev_a.user)
    communicator, _ = await open_run_socket(f"/ws/runs/{queued_run.id}/", [ORIGIN, cookie_header(cookies)])

    def expire_silently() -> None:  # as the idle TTL does in Redis: no signal at all
        record = record_for(cookies)
        assert record is not None
        session_store().delete(record.key, user_id=record.user_id)

    await sync_to_async(expire_silently)()
    assert await closed_with(communicator, timeout=4.0) == 4401


async def test_a_check_that_fails_closes_the_socket_rather_than_stopping_the_checks(
    cast, queued_run, settings, monkeypatch
):
    """A database restart mid-check: the socket is closed (fail closed), never left open and unchecked."""
    settings.STREAM_REVALIDATE_SECONDS = 1
    communicator, _ = await open_run_socket(f"/ws/runs/{queued_run.id}/", key_headers(cast.dev_a.api_secret))

    def broken(*args, **kwargs):
        raise OperationalError("the server closed the connection unexpectedly")

    monkeypatch.setattr(consumers, "revalidate", broken)
    assert await closed_with(communicator, timeout=4.0) == 4401


async def test_revoking_the_api_key_ends_its_sse_stream_with_an_error_event(cast, queued_run):
    response = await AsyncClient().get(url(queued_run.id), headers={"x-api-key": cast.dev_a.api_secret})
    assert response.status_code == 200
    frames = body(response)
    assert (await frames.next())[0] == "run.status"
    await sync_to_async(api_key_revoke)(api_key=cast.dev_a.api_key, actor=cast.admin_a.user)
    kind, _, event = await frames.next(timeout=SIGNAL_BOUND_S)
    assert kind == "error"
    assert event["kind"] == "credentials_revoked"
    assert event["run_id"] == str(queued_run.id)
    assert await frames.ended()
    assert (await Run.objects.aget(pk=queued_run.pk)).status == RunStatus.QUEUED


async def test_signing_out_everywhere_ends_a_session_sse_stream(cast, queued_run):
    client = AsyncClient()
    cookies = await sync_to_async(session_cookies_for)(cast.dev_a.user)
    for name, value in cookies.items():
        client.cookies[name] = value
    response = await client.get(url(queued_run.id))
    assert response.status_code == 200
    frames = body(response)
    assert (await frames.next())[0] == "run.status"
    await sync_to_async(sessions_revoke_all)(
        user=cast.dev_a.user, actor=cast.dev_a.user, reason="signed_out_everywhere"
    )
    kind, _, event = await frames.next(timeout=SIGNAL_BOUND_S)
    assert (kind, event["kind"]) == ("error", "credentials_revoked")
    assert await frames.ended()


async def test_an_expired_api_key_ends_the_sse_stream_on_the_timer(cast, queued_run, settings):
    settings.STREAM_REVALIDATE_SECONDS = 1
    response = await AsyncClient().get(url(queued_run.id), headers={"x-api-key": cast.dev_a.api_secret})
    frames = body(response)
    assert (await frames.next())[0] == "run.status"
    # Expiry sends no signal: only the timer can notice it.
    await ApiKey.objects.filter(pk=cast.dev_a.api_key.pk).aupdate(expires_at=timezone.now())
    kind, _, event = await frames.next(timeout=4.0)
    assert (kind, event["kind"]) == ("error", "credentials_revoked")


# --- The check right after subscribing, answered from the verified-keys cache (issue #13) ----------------------


async def _verified(secret: str) -> KeyPrincipal:
    """A principal as a stream's connect makes it: the key verified (and remembered by the cache)."""
    return KeyPrincipal(await sync_to_async(api_key_verify)(secret))


async def test_a_key_verified_recently_is_checked_again_without_the_database(cast):
    principal = await _verified(cast.dev_a.api_secret)
    context = await sync_to_async(org_context_for)(principal)
    assert context is not None
    token = await row_cache.ageneration()
    assert revalidate_cached(principal, context, token=token) == CachedVerdict(refused=None)
    # A capability the key lacks is refused from the cache too.
    assert revalidate_cached(principal, context, token=token, capability="keys:write") == CachedVerdict(refused=4403)
    # A session is always checked against the store and the database.
    record = await sync_to_async(lambda: record_for(session_cookies_for(cast.dev_a.user)))()
    assert record is not None
    session = SessionPrincipal(user=cast.dev_a.user, session=record)
    assert revalidate_cached(session, context, token=token) is None


async def test_a_revocation_committed_before_the_subscription_is_seen_when_the_watch_starts(cast, queued_run):
    """The key is verified (and cached) as the stream connects, then revoked before the stream subscribes, so its
    signal reaches nobody: the check after subscribing must not trust the cached verdict."""
    principal = await _verified(cast.dev_a.api_secret)
    context = await sync_to_async(org_context_for)(principal)
    assert context is not None
    await sync_to_async(api_key_revoke)(api_key=cast.dev_a.api_key, actor=cast.admin_a.user)
    # The cache cannot vouch for it any more: the token read with the subscription is the new generation.
    layer = get_channel_layer()
    channel = await layer.new_channel()
    groups = [events.run_group(queued_run.id), revocation.org_group(cast.org_a.pk)]
    token = await subscribe(layer, groups, channel, principal=principal)
    try:
        assert token == row_cache.generation()
        assert revalidate_cached(principal, context, token=token) is None
        start = await awatch_start(principal=principal, context=context, run_id=queued_run.id, token=token)
    finally:
        for group in groups:
            await layer.group_discard(group, channel)
    assert (start.refused, start.run) == (4401, None)
    assert (await Run.objects.aget(pk=queued_run.pk)).attached_at is None  # nothing attached for a revoked key


async def test_a_watcher_reads_the_generation_with_its_join_or_after_it(cast, settings):
    """``subscribe``: an org API key's watcher gets the current generation read with its join (the channel layer's
    Redis is the cache's), or in a read of its own once joined (a layer elsewhere); a session's gets none (its hop
    reads its verdict). Either way the watcher is in its groups, and hears what is sent to them."""
    principal = await _verified(cast.dev_a.api_secret)
    record = await sync_to_async(lambda: record_for(session_cookies_for(cast.dev_a.user)))()
    assert record is not None
    session = SessionPrincipal(user=cast.dev_a.user, session=record)
    current = row_cache.generation()
    assert current is not None
    shared = get_channel_layer()
    assert isinstance(shared, RedisChannelLayer)
    assert shared.is_at(settings.REDIS_URL)
    # The same server, another database: not the cache's Redis.
    base, _, db = settings.REDIS_URL.rpartition("/")
    other_db = (int(db) + 1) % 16 if db.isdigit() else 1
    elsewhere = RedisChannelLayer(hosts=[{"address": f"{base}/{other_db}"}], prefix="cf-test")
    assert not elsewhere.is_at(settings.REDIS_URL)
    try:
        for layer in (shared, elsewhere):
            channel = await layer.new_channel()
            assert await subscribe(layer, ["watched"], channel, principal=principal) == current
            other = await layer.new_channel()
            assert await subscribe(layer, ["watched"], other, principal=session) is None
            await layer.group_send("watched", {"type": "t", "n": 1})
            assert (await layer.receive(channel))["n"] == (await layer.receive(other))["n"] == 1
            for member in (channel, other):
                await layer.group_discard("watched", member)
    finally:
        await elsewhere.flush()
        await elsewhere.close_pools()


def test_every_revocation_signal_replaces_the_authorization_generation_before_it_is_sent(cast):
    """What ``revalidate_cached`` relies on: a stream that missed a signal finds the generation changed."""
    before = row_cache.generation()
    revocation.signal_org(cast.org_a.pk)
    after = row_cache.generation()
    assert after is not None
    assert after != before
    revocation.signal_user(cast.dev_a.user.pk)
    assert row_cache.generation() not in {before, after}
