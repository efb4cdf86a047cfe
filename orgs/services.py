"""Writes for accounts, organizations, memberships, invitations and org API keys.

Every function is keyword-only, atomic, and sends the domain signal the audit trail records, inside the same
transaction. Callers (views, serializers, commands) never save these models themselves.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from django.conf import settings
from django.contrib.auth.hashers import make_password
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.text import slugify

from orgs import signals
from orgs.models import Actor, ApiKey, Invitation, Membership, Organization, Role, SignupConfirmation, User
from orgs.permissions import ALL_CAPABILITIES, DEFAULT_API_KEY_SCOPES, TEAM_MANAGE, capabilities_for_role
from orgs.tokens import api_key_digest, generate_api_key

logger = logging.getLogger(__name__)


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


# --- Self-service sign-up -------------------------------------------------------------------------

SIGNUP_CONFIRMATION_TTL = timedelta(hours=24)
SIGNUP_CLOSED = "signup_closed"
SIGNUP_CLOSED_MESSAGE = "Sign-up is by invitation only on this server: ask an Admin of your organization to invite you."
INVALID_SIGNUP_LINK_MESSAGE = "This confirmation link is invalid, has expired or has already been used."


def signup_is_open() -> bool:
    """Self-service sign-up must prove the address by mail. Production without SMTP cannot, so it is closed there
    (people join by invitation); development without SMTP prints the mail on the console."""
    return bool(settings.EMAIL_ENABLED or not settings.PRODUCTION)


def _mail_on_commit(*, subject: str, body: str, to: str) -> None:
    def send() -> None:
        try:
            send_mail(subject=subject, message=body, from_email=None, recipient_list=[to])
        except Exception:  # the sign-up itself stands; the person can sign up again to get another link
            logger.exception("sign-up mail could not be sent")

    transaction.on_commit(send)


@transaction.atomic
def user_signup(
    *, email: str, password: str, org_name: str, name: str = "", confirm_url_template: str, login_url: str
) -> None:
    """Starts a self-service sign-up, and on purpose tells the caller nothing about the address:

    * a new address gets an inactive account, its organization (the account is its Admin) and a single-use
      confirmation link by mail (``confirm_url_template`` contains ``{token}``);
    * an address whose sign-up is still unconfirmed: that sign-up is replaced by this one and a fresh link is
      mailed, so whoever holds the mailbox decides which password the account gets;
    * an address that has an account: nothing is created; its holder is told by mail when SMTP is configured.

    Each case hashes the password once, so the time taken does not tell them apart either.
    """
    if not signup_is_open():
        raise ValidationError(SIGNUP_CLOSED_MESSAGE, code=SIGNUP_CLOSED)
    email = User.objects.normalize_email(email).lower()
    if not org_name.strip():
        raise ValidationError({"org_name": "An organization needs a name."})
    existing = User.objects.filter(email__iexact=email).first()
    if existing is not None:
        pending = SignupConfirmation.objects.select_for_update().filter(user=existing).first()
        if pending is None or existing.is_active:
            make_password(password)  # the work creating an account would have done
            _signup_attempt_notify(email=email, login_url=login_url)
            return
        _signup_discard(pending)
    try:
        with transaction.atomic():
            user = User.objects.create_user(email=email, password=password, name=name.strip(), is_active=False)
    except IntegrityError:  # the same address signed up a moment ago: an existing account, as far as this goes
        _signup_attempt_notify(email=email, login_url=login_url)
        return
    org = organization_create(name=org_name, admin=user)
    token = secrets.token_urlsafe(32)
    SignupConfirmation.objects.create(
        user=user, org=org, token_hash=_token_hash(token), expires_at=timezone.now() + SIGNUP_CONFIRMATION_TTL
    )
    signals.user_signed_up.send(sender=User, org=org, actor=user, user=user)
    hours = int(SIGNUP_CONFIRMATION_TTL.total_seconds() // 3600)
    _mail_on_commit(
        subject="Confirm your CesaFlow account",
        body="Someone, hopefully you, signed up for CesaFlow with this address."
        f"\n\nConfirm it within {hours} hours to sign in: {confirm_url_template.format(token=token)}"
        "\n\nIf it was not you, ignore this message: an unconfirmed account is deleted.\n",
        to=email,
    )


def _signup_attempt_notify(*, email: str, login_url: str) -> None:
    if settings.EMAIL_ENABLED:
        _mail_on_commit(
            subject="Sign-up attempt with your CesaFlow address",
            body="Someone tried to sign up for CesaFlow with this address, which already has an account."
            f"\n\nIf it was you, sign in instead: {login_url}"
            "\n\nIf it was not, ignore this message: nothing was changed.\n",
            to=email,
        )


def _signup_discard(confirmation: SignupConfirmation) -> None:
    """Deletes an unconfirmed (inactive) sign-up: its account and the org it started. Nobody else can be in that
    org, since an unconfirmed account cannot sign in to invite anyone; the guard keeps one that somehow has."""
    user_id, org_id = confirmation.user_id, confirmation.org_id
    if not Membership.objects.filter(org_id=org_id).exclude(user_id=user_id).exists():
        Organization.objects.filter(id=org_id).delete()
    User.objects.filter(id=user_id, is_active=False).delete()  # the confirmation row goes with it


WRONG_SIGNUP_PASSWORD_MESSAGE = "That is not the password chosen when signing up."  # noqa: S105 (a message)


def signup_confirmation_get_pending(*, token: str) -> SignupConfirmation | None:
    confirmation = SignupConfirmation.objects.filter(token_hash=_token_hash(token)).first()
    return confirmation if confirmation is not None and confirmation.is_pending() else None


@transaction.atomic
def signup_confirm(*, token: str, password: str) -> tuple[User, Organization]:
    """Activates the account of a pending sign-up; the link works once, and only with the password chosen at
    sign-up (whoever reads the link in a log, or signed up with someone else's address, cannot use it)."""
    confirmation = (
        SignupConfirmation.objects.select_for_update()
        .select_related("user", "org")
        .filter(token_hash=_token_hash(token))
        .first()
    )
    if confirmation is None or not confirmation.is_pending():
        raise ValidationError(INVALID_SIGNUP_LINK_MESSAGE)
    user, org = confirmation.user, confirmation.org
    if not user.check_password(password):
        raise ValidationError({"password": WRONG_SIGNUP_PASSWORD_MESSAGE})
    user.is_active = True
    user.save(update_fields=["is_active"])
    confirmation.delete()
    signals.signup_confirmed.send(sender=User, org=org, actor=user, user=user)
    return user, org


@transaction.atomic
def signups_unconfirmed_purge() -> int:
    """Deletes the sign-ups whose link expired unused (account and org); returns how many. Idempotent."""
    expired = SignupConfirmation.objects.select_for_update(skip_locked=True).filter(expires_at__lte=timezone.now())
    # An account an operator activated by hand is kept; only its stale link goes.
    expired.filter(user__is_active=True).delete()
    count = 0
    for confirmation in expired.filter(user__is_active=False):
        _signup_discard(confirmation)
        count += 1
    return count


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
    """Changes the role. The member's org API keys lose the scopes the new role lacks, and a member who may no
    longer manage the team has their pending invitations revoked: nobody keeps, through a key or a link they made,
    a power their role no longer grants."""
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
    _api_keys_clip_to_role(membership=membership, actor=actor)
    if TEAM_MANAGE not in capabilities_for_role(role):
        _invitations_revoke_sent_by(membership=membership, actor=actor)
    return membership


@transaction.atomic
def membership_remove(*, membership: Membership, actor: Actor, revoke_api_keys: bool = True) -> None:
    """Removes the member. Their pending invitations to the org are revoked; their active org API keys too unless
    ``revoke_api_keys`` is False (the keys then keep working for the org, as any key whose creator left)."""
    admins = _lock_admins(membership.org)
    membership.refresh_from_db()
    if membership.role == Role.ADMIN and len(admins) <= 1:
        raise ValidationError("The last Admin cannot be removed: promote someone else first.", code=LAST_ADMIN)
    _invitations_revoke_sent_by(membership=membership, actor=actor)
    if revoke_api_keys:
        for api_key in _api_keys_created_by(membership).exclude(expires_at__lte=timezone.now()):
            api_key_revoke(api_key=api_key, actor=actor)
    signals.member_removed.send(sender=Membership, org=membership.org, actor=actor, membership=membership)
    membership.delete()


def _api_keys_created_by(membership: Membership) -> QuerySet[ApiKey]:
    """The member's unrevoked org API keys in the membership's org, locked for the change at hand."""
    return (
        ApiKey.objects.select_for_update()
        .select_related("org")
        .filter(org=membership.org, created_by=membership.user_id, revoked_at=None)
        .order_by("created_at", "id")
    )


def _api_keys_clip_to_role(*, membership: Membership, actor: Actor) -> None:
    allowed = capabilities_for_role(membership.role)
    now = timezone.now()
    for api_key in _api_keys_created_by(membership):
        removed = sorted(set(api_key.scopes) - allowed)
        if not removed:
            continue
        api_key.scopes = sorted(set(api_key.scopes) & allowed)
        api_key.clipped_scopes = sorted(set(api_key.clipped_scopes) | set(removed))
        api_key.scopes_clipped_at = now
        api_key.save(update_fields=["scopes", "clipped_scopes", "scopes_clipped_at"])
        signals.api_key_scopes_clipped.send(
            sender=ApiKey, org=api_key.org, actor=actor, api_key=api_key, removed_scopes=removed
        )
        if not api_key.scopes:
            # Every key is made with at least one scope; one left with none has no purpose but to confuse.
            api_key_revoke(api_key=api_key, actor=actor)


def _invitations_revoke_sent_by(*, membership: Membership, actor: Actor) -> None:
    pending = (
        Invitation.objects.select_for_update()
        .select_related("org")
        .filter(org=membership.org, invited_by=membership.user_id, accepted_at=None, revoked_at=None)
        .filter(expires_at__gt=timezone.now())
        .order_by("created_at", "id")
    )
    for invitation in pending:
        invitation_revoke(invitation=invitation, actor=actor)


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
    # The invitation proves the address (the link was mailed or handed to its holder): an unconfirmed sign-up with
    # it, perhaps squatted by someone else, gives way.
    for pending in SignupConfirmation.objects.select_for_update().filter(
        user__email__iexact=email, user__is_active=False
    ):
        _signup_discard(pending)
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
    if isinstance(actor, str):  # a CesaFlow operator is no member: a label grants nothing
        return frozenset()
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
        # A key made by a key belongs to the person behind that key: their demotion or removal reaches it too.
        created_by=actor if isinstance(actor, User) else actor.created_by if isinstance(actor, ApiKey) else None,
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


def api_key_use_due(*, api_key: ApiKey, now: datetime) -> bool:
    """Whether a use at ``now`` moves ``last_used_at`` (at most once a minute per key)."""
    return api_key.last_used_at is None or now - api_key.last_used_at >= LAST_USED_RESOLUTION


def api_key_record_use(*, api_key: ApiKey) -> None:
    """Updates ``last_used_at`` at most once a minute per key (one UPDATE, no read-modify-write race)."""
    now = timezone.now()
    if not api_key_use_due(api_key=api_key, now=now):
        return
    ApiKey.objects.filter(pk=api_key.pk).exclude(last_used_at__gt=now - LAST_USED_RESOLUTION).update(last_used_at=now)
    api_key.last_used_at = now
