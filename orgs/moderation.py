"""Writes a CesaFlow operator makes to organizations and accounts (``nexus.actions`` calls them): suspending and
reactivating an organization, disabling and enabling an account, lifting a sign-in lock.

Like ``orgs.services``: keyword-only, atomic, and each sends the domain signal the audit trail records, inside the
same transaction. ``actor`` is the operator's label ("CesaFlow operator (<email>)"), which grants nothing.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from orgs import login_guard, signals
from orgs.models import Actor, Membership, Organization, User
from orgs.revocation import signal_org_on_commit
from orgs.sessions.services import sessions_revoke_all

SUSPENSION_REASON_MAX_CHARS = 2000
# ``sessions_ended``'s reason when an account is disabled (its audit row is ``user.disabled``, naming who did it).
SESSIONS_END_REASON = "user_disabled"


@transaction.atomic
def org_suspend(*, org: Organization, actor: Actor, reason: str) -> Organization:
    """Suspends the org (``orgs.permissions.ORG_SUSPENDED`` says what that refuses); its open streams re-check at
    once (``orgs.revocation``). Cancelling its queued and running runs is the runs app's
    (``runs.services.runs_cancel_for_org``): ``nexus.actions.org_suspend`` does both in one transaction."""
    reason = reason.strip()
    if not reason or len(reason) > SUSPENSION_REASON_MAX_CHARS:
        raise ValidationError({"reason": f"Give a reason (at most {SUSPENSION_REASON_MAX_CHARS:,} characters)."})
    locked = Organization.objects.select_for_update().get(pk=org.pk)
    if locked.suspended_at is not None:
        raise ValidationError("This organization is already suspended.", code="already_suspended")
    org.suspended_at, org.suspended_reason = timezone.now(), reason
    org.save(update_fields=["suspended_at", "suspended_reason"])
    signals.org_suspended.send(sender=Organization, org=org, actor=actor, reason=reason)
    return org


@transaction.atomic
def org_reactivate(*, org: Organization, actor: Actor) -> Organization:
    """Lifts the suspension. The runs it cancelled stay cancelled."""
    locked = Organization.objects.select_for_update().get(pk=org.pk)
    if locked.suspended_at is None:
        raise ValidationError("This organization is not suspended.", code="not_suspended")
    reason = locked.suspended_reason
    org.suspended_at, org.suspended_reason = None, ""
    org.save(update_fields=["suspended_at", "suspended_reason"])
    signals.org_reactivated.send(sender=Organization, org=org, actor=actor, reason=reason)
    return org


@transaction.atomic
def user_disable(*, user: User, actor: Actor) -> int:
    """Deactivates the account and ends all its sessions; returns how many sessions ended. The org API keys the
    person made stop working while the account is disabled (``api_key_get_active_by_secret`` refuses them) and work
    again when it is enabled; revoking them for good is a separate, deliberate step. Open streams of either kind
    close within seconds (revocation signals to the user and to each of their orgs)."""
    if not User.objects.filter(pk=user.pk, is_active=True).exists():
        raise ValidationError("This account is already disabled.", code="already_disabled")
    user.is_active = False
    user.save(update_fields=["is_active"])
    # Sessions end after the row changes: a session signed in meanwhile is refused on its next request anyway
    # (every request checks that its user is active).
    ended = sessions_revoke_all(user=user, actor=None, reason=SESSIONS_END_REASON)
    for membership in Membership.objects.filter(user=user).select_related("org"):
        signal_org_on_commit(membership.org)  # streams opened with the person's API keys re-check too
    signals.user_disabled.send(sender=User, org=None, actor=actor, user=user, sessions_ended=ended)
    return ended


@transaction.atomic
def user_enable(*, user: User, actor: Actor) -> User:
    if not User.objects.filter(pk=user.pk, is_active=False).exists():
        raise ValidationError("This account is already active.", code="already_active")
    user.is_active = True
    user.save(update_fields=["is_active"])
    signals.user_enabled.send(sender=User, org=None, actor=actor, user=user)
    return user


@transaction.atomic
def login_unlock(*, email: str, actor: Actor) -> bool:
    """Lifts the sign-in lock of the account ``email`` and restarts its failure count; True if it was locked.
    Locks on client IPs stay: they belong to an address, not to this account. Audited either way."""
    was_locked = login_guard.account_lock_clear(email=email)
    normalized = User.objects.normalize_email(email).strip().lower()
    signals.login_unlocked.send(sender=User, org=None, actor=actor, email=normalized[:254], was_locked=was_locked)
    return was_locked
