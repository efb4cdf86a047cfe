"""Revocation signals: tell open websockets and SSE streams to re-check their credentials now.

Streams authorize when they open and then hold no credential of their own, so a revoked API key, an ended session
or a removed member must reach them. Each stream listens on two channel-layer groups, its org's and (for a
session) its user's; anything that can take a right away sends ``auth.revalidate`` there after its transaction
commits, and the stream re-runs the one authentication path (``orgs.authentication``). Streams also re-check on
a timer (``settings.STREAM_REVALIDATE_SECONDS``), so a lost signal, an expired key or a session that timed out
ends them too. The signal carries nothing but its type: the stream decides.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction
from django.dispatch import receiver

from cesaflow.lib import row_cache
from orgs import signals
from orgs.models import Organization

logger = logging.getLogger("cesaflow.auth")

MESSAGE_TYPE: Final = "auth.revalidate"


def user_group(user_id: object) -> str:
    return f"auth.user.{user_id}"


def org_group(org_id: object) -> str:
    return f"auth.org.{org_id}"


def _send(group: str) -> None:
    # The generation first: a stream that joins after this signal went out, and so misses it, checks against a
    # generation whose cached entries were all read after the change (``orgs.authentication.revalidate_cached``).
    row_cache.invalidate()
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group, {"type": MESSAGE_TYPE})
    except Exception:
        # Streams re-check on their timer anyway: a lost signal delays a close, it never keeps one open for good.
        logger.warning("revocation signal to %s not sent", group, exc_info=True)


def signal_user(user_id: object) -> None:
    """A session of this user ended: their open streams re-check now."""
    _send(user_group(user_id))


def signal_org(org_id: object) -> None:
    """Someone's rights in this org shrank (a key revoked, a member removed or demoted, the org suspended): its
    streams re-check."""
    _send(org_group(org_id))


def signal_org_on_commit(org: Organization) -> None:
    org_id = org.pk
    transaction.on_commit(lambda: signal_org(org_id))


@receiver(signals.org_suspended, dispatch_uid="revocation_org_suspended")
@receiver(signals.api_key_revoked, dispatch_uid="revocation_api_key_revoked")
@receiver(signals.member_removed, dispatch_uid="revocation_member_removed")
@receiver(signals.member_role_changed, dispatch_uid="revocation_member_role_changed")
def _on_rights_shrunk(sender: Any, org: Organization, **kwargs: Any) -> None:
    signal_org_on_commit(org)
