"""Writes for accounts, organizations, memberships, invitations and org API keys.

Every function is keyword-only, atomic, and sends the domain signal the audit trail records, inside the same
transaction. Callers (views, serializers, commands) never save these models themselves.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.text import slugify

from orgs import signals
from orgs.models import Actor, ApiKey, Invitation, Membership, Organization, Role, User
from orgs.permissions import ALL_CAPABILITIES, DEFAULT_API_KEY_SCOPES, capabilities_for_role
from orgs.tokens import api_key_digest, generate_api_key


def _unique_slug(name: str) -> str:
    base = slugify(name)[:40].strip("-") or "org"
    slug = base
    while Organization.objects.filter(slug=slug).exists():
        slug = f"{base}-{secrets.token_hex(3)}"
    return slug


@transaction.atomic
def organization_create(*, name: str, admin: User, slug: str | None = None) -> Organization:
    """A new org with ``admin`` as its first Admin."""
    name = name.strip()
    if not name:
        raise ValidationError({"name": "An organization needs a name."})
    if slug is not None:
        slug = slugify(slug)
        if not slug:
            raise ValidationError({"slug": "Use letters, digits and hyphens."})
        if Organization.objects.filter(slug=slug).exists():
            raise ValidationError({"slug": "This slug is taken."})
    org = Organization.objects.create(name=name, slug=slug or _unique_slug(name))
    Membership.objects.create(user=admin, org=org, role=Role.ADMIN)
    signals.org_created.send(sender=Organization, org=org, actor=admin)
    return org


@transaction.atomic
def user_signup(*, email: str, password: str, org_name: str, name: str = "") -> tuple[User, Organization]:
    """Sign-up creates the user and their organization; the user becomes its Admin."""
    email = User.objects.normalize_email(email).lower()
    if User.objects.filter(email__iexact=email).exists():
        raise ValidationError({"email": "An account with this email already exists."})
    try:
        with transaction.atomic():
            user = User.objects.create_user(email=email, password=password, name=name.strip())
    except IntegrityError:
        raise ValidationError({"email": "An account with this email already exists."}) from None
    org = organization_create(name=org_name, admin=user)
    signals.user_signed_up.send(sender=User, org=org, actor=user, user=user)
    return user, org


class _Keep(Enum):
    """'Leave this setting as it is' for optional settings where None is a meaningful value (no cap)."""

    KEEP = "keep"


KEEP = _Keep.KEEP
MONTHLY_TOKEN_CAP_MAX = 10**15  # far above any real month, far below the column's limit


@transaction.atomic
def org_update(
    *,
    org: Organization,
    actor: Actor,
    name: str | None = None,
    monthly_token_cap: int | _Keep | None = KEEP,
    agents_may_run_commands: bool | None = None,
    agent_limits: dict[str, int | float] | None = None,
) -> Organization:
    """Change the org's settings; only what is passed changes. ``monthly_token_cap=None`` removes the cap."""
    # Validate everything before touching ``org``, so a refused change leaves the caller's object as it was.
    if name is not None:
        name = name.strip()
        if not name:
            raise ValidationError({"name": "An organization needs a name."})
    if isinstance(monthly_token_cap, int) and not 1 <= monthly_token_cap <= MONTHLY_TOKEN_CAP_MAX:
        raise ValidationError(
            {"monthly_token_cap": f"Enter a whole number of tokens from 1 to {MONTHLY_TOKEN_CAP_MAX:,}, or nothing."}
        )
    changes: dict[str, list[Any]] = {}
    if name is not None and name != org.name:
        changes["name"] = [org.name, name]
        org.name = name
    if monthly_token_cap is not KEEP and monthly_token_cap != org.monthly_token_cap:
        changes["monthly_token_cap"] = [org.monthly_token_cap, monthly_token_cap]
        org.monthly_token_cap = monthly_token_cap
    if agents_may_run_commands is not None and agents_may_run_commands != org.agents_may_run_commands:
        changes["agents_may_run_commands"] = [org.agents_may_run_commands, agents_may_run_commands]
        org.agents_may_run_commands = agents_may_run_commands
    if agent_limits is not None and agent_limits != org.agent_limits:
        # Shape only here: the runs app validated the values against its caps (runs.services.org_agent_limits_set).
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in agent_limits.values()):
            raise ValidationError({"agent_limits": "Agent limits are numbers."})
        changes["agent_limits"] = [org.agent_limits, agent_limits]
        org.agent_limits = agent_limits
    if changes:
        org.save(update_fields=list(changes))
        signals.org_settings_changed.send(sender=Organization, org=org, actor=actor, changes=changes)
    return org


# --- Memberships ------------------------------------------------------------------------------------


# The ValidationError code when a change would leave an org without an Admin (the API answers 409 with it).
LAST_ADMIN = "last_admin"


def _lock_admins(org: Organization) -> list[Membership]:
    return list(Membership.objects.select_for_update().filter(org=org, role=Role.ADMIN).order_by("id"))


@transaction.atomic
def membership_change_role(*, membership: Membership, role: str, actor: Actor) -> Membership:
    if role not in Role.values:
        raise ValidationError({"role": "Choose Admin or Developer."})
    admins = _lock_admins(membership.org)
    membership.refresh_from_db()
    old_role = membership.role
    if old_role == role:
        return membership
    if old_role == Role.ADMIN and len(admins) <= 1:
        raise ValidationError("An organization needs at least one Admin: promote someone else first.", code=LAST_ADMIN)
    membership.role = role
    membership.save(update_fields=["role"])
    signals.member_role_changed.send(
        sender=Membership, org=membership.org, actor=actor, membership=membership, old_role=old_role
    )
    return membership


@transaction.atomic
def membership_remove(*, membership: Membership, actor: Actor) -> None:
    admins = _lock_admins(membership.org)
    membership.refresh_from_db()
    if membership.role == Role.ADMIN and len(admins) <= 1:
        raise ValidationError("The last Admin cannot be removed: promote someone else first.", code=LAST_ADMIN)
    signals.member_removed.send(sender=Membership, org=membership.org, actor=actor, membership=membership)
    membership.delete()


# --- Invitations ------------------------------------------------------------------------------------


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@transaction.atomic
def invitation_create(
    *, org: Organization, email: str, role: str, actor: User, accept_url_template: str | None = None
) -> tuple[Invitation, str]:
    """Returns the invitation and its one-time token (shown to the admin, mailed when SMTP is configured).

    ``accept_url_template`` contains ``{token}``; when given and email is enabled, the link is mailed.
    """
    email = User.objects.normalize_email(email).lower()
    if role not in Role.values:
        raise ValidationError({"role": "Choose Admin or Developer."})
    if Membership.objects.filter(org=org, user__email__iexact=email).exists():
        raise ValidationError({"email": "This person is already a member."})
    now = timezone.now()
    # A new invitation replaces any pending one for the same address.
    Invitation.objects.filter(org=org, email__iexact=email, accepted_at=None, revoked_at=None).update(revoked_at=now)
    token = secrets.token_urlsafe(32)
    invitation = Invitation.objects.create(
        org=org,
        email=email,
        role=role,
        token_hash=_token_hash(token),
        invited_by=actor,
        expires_at=now + timedelta(days=settings.INVITATION_TTL_DAYS),
    )
    signals.invitation_sent.send(sender=Invitation, org=org, actor=actor, invitation=invitation)
    if accept_url_template and settings.EMAIL_ENABLED:
        link = accept_url_template.format(token=token)
        transaction.on_commit(
            lambda: send_mail(
                subject=f"You are invited to {org.name} on CesaFlow",
                message=f"{actor.display_name} invited you to join {org.name} as {invitation.get_role_display()}."
                f"\n\nAccept within {settings.INVITATION_TTL_DAYS} days: {link}\n",
                from_email=None,
                recipient_list=[email],
                fail_silently=True,
            )
        )
    return invitation, token


def invitation_get_pending(*, token: str) -> Invitation | None:
    try:
        invitation = Invitation.objects.select_related("org").get(token_hash=_token_hash(token))
    except Invitation.DoesNotExist:
        return None
    return invitation if invitation.is_pending() else None


@transaction.atomic
def invitation_accept(*, token: str, user: User) -> Membership:
    invitation = (
        Invitation.objects.select_for_update().select_related("org").filter(token_hash=_token_hash(token)).first()
    )
    if invitation is None or not invitation.is_pending():
        raise ValidationError("This invitation link is invalid, expired or already used.")
    if invitation.email.lower() != user.email.lower():
        raise ValidationError("This invitation was sent to a different email address.")
    membership, created = Membership.objects.get_or_create(
        user=user, org=invitation.org, defaults={"role": invitation.role}
    )
    invitation.accepted_at = timezone.now()
    invitation.accepted_by = user
    invitation.save(update_fields=["accepted_at", "accepted_by"])
    if created:
        signals.invitation_accepted.send(
            sender=Invitation, org=invitation.org, actor=user, invitation=invitation, membership=membership
        )
    return membership


@transaction.atomic
def user_signup_from_invitation(*, token: str, password: str, name: str = "") -> tuple[User, Membership]:
    """An invitee without an account: creates the account for the invited email (no new org) and accepts.

    Either both happen or neither does: a used or revoked link leaves no orphan account behind.
    """
    invitation = invitation_get_pending(token=token)
    if invitation is None:
        raise ValidationError("This invitation link is invalid, expired or already used.")
    email = invitation.email.lower()
    if User.objects.filter(email__iexact=email).exists():
        raise ValidationError("An account with this email already exists: log in to accept the invitation.")
    try:
        with transaction.atomic():
            user = User.objects.create_user(email=email, password=password, name=name.strip())
    except IntegrityError:
        raise ValidationError("An account with this email already exists: log in to accept the invitation.") from None
    membership = invitation_accept(token=token, user=user)
    signals.user_signed_up.send(sender=User, org=membership.org, actor=user, user=user)
    return user, membership


@transaction.atomic
def invitation_revoke(*, invitation: Invitation, actor: Actor) -> Invitation:
    if invitation.accepted_at is None and invitation.revoked_at is None:
        invitation.revoked_at = timezone.now()
        invitation.save(update_fields=["revoked_at"])
        signals.invitation_revoked.send(sender=Invitation, org=invitation.org, actor=actor, invitation=invitation)
    return invitation


# --- Org API keys -----------------------------------------------------------------------------------


def _actor_capabilities(org: Organization, actor: Actor) -> frozenset[str]:
    if isinstance(actor, ApiKey):
        return frozenset(actor.scopes) if actor.org_id == org.id else frozenset()
    if actor is None:  # a self-hoster's management command acts as the operator
        return ALL_CAPABILITIES
    membership = Membership.objects.filter(org=org, user=actor).first()
    return capabilities_for_role(membership.role) if membership else frozenset()


@transaction.atomic
def api_key_create(
    *,
    org: Organization,
    name: str,
    actor: Actor,
    scopes: list[str] | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Returns the key and its secret, which is never retrievable again."""
    name = name.strip()
    if not name:
        raise ValidationError({"name": "Give the key a name."})
    chosen = frozenset(DEFAULT_API_KEY_SCOPES if scopes is None else scopes)
    unknown = chosen - ALL_CAPABILITIES
    if unknown:
        raise ValidationError({"scopes": f"Unknown scopes: {', '.join(sorted(unknown))}."})
    beyond = chosen - _actor_capabilities(org, actor)
    if beyond:
        raise ValidationError({"scopes": f"You cannot grant scopes you lack: {', '.join(sorted(beyond))}."})
    if not chosen:
        raise ValidationError({"scopes": "Pick at least one scope."})
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationError({"expires_at": "The expiry must be in the future."})
    generated = generate_api_key()
    api_key = ApiKey.objects.create(
        org=org,
        name=name,
        prefix=generated.prefix,
        digest=api_key_digest(generated.secret),
        last_four=generated.secret[-4:],
        scopes=sorted(chosen),
        created_by=actor if isinstance(actor, User) else None,
        expires_at=expires_at,
    )
    signals.api_key_created.send(sender=ApiKey, org=org, actor=actor, api_key=api_key)
    return api_key, generated.secret


@transaction.atomic
def api_key_revoke(*, api_key: ApiKey, actor: Actor) -> ApiKey:
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
        signals.api_key_revoked.send(sender=ApiKey, org=api_key.org, actor=actor, api_key=api_key)
    return api_key


LAST_USED_RESOLUTION = timedelta(minutes=1)


def api_key_record_use(*, api_key: ApiKey) -> None:
    """Updates ``last_used_at`` at most once a minute per key (one UPDATE, no read-modify-write race)."""
    now = timezone.now()
    if api_key.last_used_at is not None and now - api_key.last_used_at < LAST_USED_RESOLUTION:
        return
    ApiKey.objects.filter(pk=api_key.pk).exclude(last_used_at__gt=now - LAST_USED_RESOLUTION).update(last_used_at=now)
    api_key.last_used_at = now
