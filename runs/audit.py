"""The audit trail: records domain signals and auth events, synchronously, in the sender's transaction.

Lower apps never import this module; they send signals (``orgs.signals``) and this module listens.
IP and user agent come from the request context the middleware binds, never from the caller.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.db import models
from django.dispatch import receiver

from cesaflow.lib import request_context
from keys import signals as key_signals
from keys.models import ProviderKey
from orgs import signals
from orgs.models import ApiKey, Membership, Organization, User, actor_label
from orgs.moderation import SESSIONS_END_REASON
from runs.models import AuditEvent

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MAX_TEXT = 200


def _clean(value: Any) -> Any:
    """Metadata is small and inert: control characters (log injection, ANSI escapes) are dropped."""
    if isinstance(value, str):
        return _CONTROL.sub("", value)[:_MAX_TEXT]
    if isinstance(value, dict):
        return {str(k)[:64]: _clean(v) for k, v in list(value.items())[:20]}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in list(value)[:20]]
    if value is None or isinstance(value, bool | int | float):
        return value
    return _clean(str(value))


def audit_record(
    *,
    event: str,
    org: Organization | None,
    actor: User | ApiKey | str | None,
    target: models.Model | None = None,
    metadata: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one audit event. ``actor`` is a user, an org API key, a label (an unauthenticated email) or None."""
    if event not in AuditEvent.EVENTS:
        raise ValueError(f"unregistered audit event {event!r}")
    context = request_context.current()
    actor_user = actor if isinstance(actor, User) else None
    actor_api_key = actor if isinstance(actor, ApiKey) else None
    label = actor if isinstance(actor, str) else actor_label(actor)
    return AuditEvent.objects.create(
        org=org,
        event=event,
        actor_user=actor_user,
        actor_api_key=actor_api_key,
        actor_label=_clean(label)[:254],
        target_type=(target._meta.model_name or "") if target is not None else "",
        target_id=str(target.pk) if target is not None else "",
        ip=context.ip,
        user_agent=_clean(context.user_agent)[:256],
        metadata=_clean(metadata or {}),
    )


def _orgs_of(user: User | None) -> Iterable[Organization | None]:
    """Auth events belong to every org the user is in (each org's admins see their members' sign-ins)."""
    if user is None:
        return [None]
    orgs = [m.org for m in Membership.objects.filter(user=user).select_related("org")]
    return orgs or [None]


# --- Auth (Django's signals) ------------------------------------------------------------------------


@receiver(user_logged_in, dispatch_uid="audit_login")
def _on_login(sender: Any, request: Any, user: User, **kwargs: Any) -> None:
    for org in _orgs_of(user):
        audit_record(event=AuditEvent.LOGIN_SUCCEEDED, org=org, actor=user, target=user)


@receiver(user_logged_out, dispatch_uid="audit_logout")
def _on_logout(sender: Any, request: Any, user: User | None, **kwargs: Any) -> None:
    if user is None:
        return
    for org in _orgs_of(user):
        audit_record(event=AuditEvent.LOGGED_OUT, org=org, actor=user, target=user)


@receiver(signals.session_revoked, dispatch_uid="audit_session_revoked")
def _on_session_revoked(sender: Any, actor: User, user: User, device: str, **kwargs: Any) -> None:
    for org in _orgs_of(user):
        audit_record(event=AuditEvent.SESSION_REVOKED, org=org, actor=actor, target=user, metadata={"device": device})


@receiver(signals.sessions_ended, dispatch_uid="audit_sessions_ended")
def _on_sessions_ended(sender: Any, actor: User | None, user: User, count: int, reason: str, **kwargs: Any) -> None:
    if reason == SESSIONS_END_REASON:
        return  # recorded as ``user.disabled`` (with the count), naming who disabled the account
    event = AuditEvent.PASSWORD_CHANGED if reason == "password_changed" else AuditEvent.SIGNED_OUT_EVERYWHERE
    for org in _orgs_of(user):
        audit_record(event=event, org=org, actor=actor, target=user, metadata={"sessions_ended": count})


@receiver(user_login_failed, dispatch_uid="audit_login_failed")
def _on_login_failed(sender: Any, credentials: dict[str, Any], request: Any = None, **kwargs: Any) -> None:
    # Django already masks the password in ``credentials``; only the email is kept.
    email = str(credentials.get("email") or credentials.get("username") or "")[:254]
    user = User.objects.filter(email__iexact=email).first() if email else None
    for org in _orgs_of(user):
        audit_record(event=AuditEvent.LOGIN_FAILED, org=org, actor=email, target=user, metadata={"email": email})


@receiver(signals.login_locked_out, dispatch_uid="audit_locked_out")
def _on_locked_out(sender: Any, email: str, scope: str, **kwargs: Any) -> None:
    user = User.objects.filter(email__iexact=email).first() if email else None
    for org in _orgs_of(user):
        audit_record(
            event=AuditEvent.LOGIN_LOCKED_OUT,
            org=org,
            actor=email,
            target=user,
            metadata={"email": email, "scope": scope},
        )


# --- Organizations ----------------------------------------------------------------------------------


@receiver(signals.user_signed_up, dispatch_uid="audit_signed_up")
def _on_signed_up(sender: Any, org: Organization, actor: User, user: User, **kwargs: Any) -> None:
    audit_record(event=AuditEvent.USER_SIGNED_UP, org=org, actor=actor, target=user)


@receiver(signals.signup_confirmed, dispatch_uid="audit_signup_confirmed")
def _on_signup_confirmed(sender: Any, org: Organization, actor: User, user: User, **kwargs: Any) -> None:
    audit_record(event=AuditEvent.USER_SIGNUP_CONFIRMED, org=org, actor=actor, target=user)


@receiver(signals.org_created, dispatch_uid="audit_org_created")
def _on_org_created(sender: Any, org: Organization, actor: User, **kwargs: Any) -> None:
    audit_record(event=AuditEvent.ORG_CREATED, org=org, actor=actor, target=org, metadata={"name": org.name})


@receiver(signals.org_settings_changed, dispatch_uid="audit_org_settings")
def _on_org_settings(sender: Any, org: Organization, actor: Any, changes: dict[str, Any], **kwargs: Any) -> None:
    audit_record(event=AuditEvent.ORG_SETTINGS_CHANGED, org=org, actor=actor, target=org, metadata={"changes": changes})


@receiver(signals.invitation_sent, dispatch_uid="audit_invitation_sent")
def _on_invitation_sent(sender: Any, org: Organization, actor: Any, invitation: Any, **kwargs: Any) -> None:
    audit_record(
        event=AuditEvent.INVITATION_SENT,
        org=org,
        actor=actor,
        target=invitation,
        metadata={"email": invitation.email, "role": invitation.role},
    )


@receiver(signals.invitation_revoked, dispatch_uid="audit_invitation_revoked")
def _on_invitation_revoked(sender: Any, org: Organization, actor: Any, invitation: Any, **kwargs: Any) -> None:
    audit_record(
        event=AuditEvent.INVITATION_REVOKED,
        org=org,
        actor=actor,
        target=invitation,
        metadata={"email": invitation.email},
    )


@receiver(signals.invitation_accepted, dispatch_uid="audit_invitation_accepted")
def _on_invitation_accepted(
    sender: Any, org: Organization, actor: Any, invitation: Any, membership: Membership, **kwargs: Any
) -> None:
    audit_record(
        event=AuditEvent.INVITATION_ACCEPTED,
        org=org,
        actor=actor,
        target=membership,
        metadata={"email": invitation.email, "role": membership.role},
    )


@receiver(signals.member_role_changed, dispatch_uid="audit_role_changed")
def _on_role_changed(
    sender: Any, org: Organization, actor: Any, membership: Membership, old_role: str, **kwargs: Any
) -> None:
    audit_record(
        event=AuditEvent.MEMBER_ROLE_CHANGED,
        org=org,
        actor=actor,
        target=membership,
        metadata={"email": membership.user.email, "from": old_role, "to": membership.role},
    )


@receiver(signals.member_removed, dispatch_uid="audit_member_removed")
def _on_member_removed(sender: Any, org: Organization, actor: Any, membership: Membership, **kwargs: Any) -> None:
    audit_record(
        event=AuditEvent.MEMBER_REMOVED,
        org=org,
        actor=actor,
        target=membership,
        metadata={"email": membership.user.email, "role": membership.role},
    )


@receiver(signals.api_key_created, dispatch_uid="audit_api_key_created")
def _on_api_key_created(sender: Any, org: Organization, actor: Any, api_key: ApiKey, **kwargs: Any) -> None:
    audit_record(
        event=AuditEvent.API_KEY_CREATED,
        org=org,
        actor=actor,
        target=api_key,
        metadata={"name": api_key.name, "prefix": api_key.prefix, "scopes": list(api_key.scopes)},
    )


@receiver(signals.api_key_revoked, dispatch_uid="audit_api_key_revoked")
def _on_api_key_revoked(sender: Any, org: Organization, actor: Any, api_key: ApiKey, **kwargs: Any) -> None:
    audit_record(
        event=AuditEvent.API_KEY_REVOKED,
        org=org,
        actor=actor,
        target=api_key,
        metadata={"name": api_key.name, "prefix": api_key.prefix},
    )


@receiver(signals.api_key_scopes_clipped, dispatch_uid="audit_api_key_scopes_clipped")
def _on_api_key_scopes_clipped(
    sender: Any, org: Organization, actor: Any, api_key: ApiKey, removed_scopes: list[str], **kwargs: Any
) -> None:
    audit_record(
        event=AuditEvent.API_KEY_SCOPES_CLIPPED,
        org=org,
        actor=actor,
        target=api_key,
        metadata={
            "name": api_key.name,
            "prefix": api_key.prefix,
            "removed": list(removed_scopes),
            "scopes": list(api_key.scopes),
        },
    )


# --- CesaFlow operators' actions (orgs.moderation) -----------------------------------------------------------------


@receiver(signals.org_suspended, dispatch_uid="audit_org_suspended")
def _on_org_suspended(sender: Any, org: Organization, actor: Any, reason: str, **kwargs: Any) -> None:
    audit_record(event=AuditEvent.ORG_SUSPENDED, org=org, actor=actor, target=org, metadata={"reason": reason})


@receiver(signals.org_reactivated, dispatch_uid="audit_org_reactivated")
def _on_org_reactivated(sender: Any, org: Organization, actor: Any, reason: str, **kwargs: Any) -> None:
    audit_record(event=AuditEvent.ORG_REACTIVATED, org=org, actor=actor, target=org, metadata={"suspended_for": reason})


@receiver(signals.user_disabled, dispatch_uid="audit_user_disabled")
def _on_user_disabled(sender: Any, actor: Any, user: User, sessions_ended: int, **kwargs: Any) -> None:
    for org in _orgs_of(user):
        audit_record(
            event=AuditEvent.USER_DISABLED,
            org=org,
            actor=actor,
            target=user,
            metadata={"email": user.email, "sessions_ended": sessions_ended},
        )


@receiver(signals.user_enabled, dispatch_uid="audit_user_enabled")
def _on_user_enabled(sender: Any, actor: Any, user: User, **kwargs: Any) -> None:
    for org in _orgs_of(user):
        audit_record(event=AuditEvent.USER_ENABLED, org=org, actor=actor, target=user, metadata={"email": user.email})


@receiver(signals.login_unlocked, dispatch_uid="audit_login_unlocked")
def _on_login_unlocked(sender: Any, actor: Any, email: str, was_locked: bool, **kwargs: Any) -> None:
    user = User.objects.filter(email__iexact=email).first() if email else None
    for org in _orgs_of(user):
        audit_record(
            event=AuditEvent.LOGIN_UNLOCKED,
            org=org,
            actor=actor,
            target=user,
            metadata={"email": email, "was_locked": was_locked},
        )


# --- Provider keys ----------------------------------------------------------------------------------
# Metadata names the key (label, provider, last four) and never carries the secret or the sealed value.


def _key_metadata(provider_key: ProviderKey) -> dict[str, Any]:
    return {"label": provider_key.label, "provider": provider_key.provider, "last_four": provider_key.last_four}


@receiver(key_signals.provider_key_created, dispatch_uid="audit_provider_key_created")
def _on_provider_key_created(
    sender: Any, org: Organization, actor: Any, provider_key: ProviderKey, **kwargs: Any
) -> None:
    audit_record(
        event=AuditEvent.KEY_CREATED,
        org=org,
        actor=actor,
        target=provider_key,
        metadata={**_key_metadata(provider_key), "base_url": provider_key.base_url, "kid": provider_key.kid},
    )


@receiver(key_signals.provider_key_checked, dispatch_uid="audit_provider_key_checked")
def _on_provider_key_checked(
    sender: Any, org: Organization, actor: Any, provider_key: ProviderKey, old_status: str, detail: str, **kwargs: Any
) -> None:
    audit_record(
        event=AuditEvent.KEY_CHECKED,
        org=org,
        actor=actor,
        target=provider_key,
        metadata={**_key_metadata(provider_key), "from": old_status, "to": provider_key.status, "detail": detail},
    )


@receiver(key_signals.provider_key_used, dispatch_uid="audit_provider_key_used")
def _on_provider_key_used(
    sender: Any, org: Organization, actor: Any, provider_key: ProviderKey, purpose: str, reference: str, **kwargs: Any
) -> None:
    audit_record(
        event=AuditEvent.KEY_USED,
        org=org,
        actor=actor,
        target=provider_key,
        metadata={**_key_metadata(provider_key), "purpose": purpose, "reference": reference},
    )


@receiver(key_signals.provider_key_revoked, dispatch_uid="audit_provider_key_revoked")
def _on_provider_key_revoked(
    sender: Any, org: Organization, actor: Any, provider_key: ProviderKey, **kwargs: Any
) -> None:
    audit_record(
        event=AuditEvent.KEY_REVOKED, org=org, actor=actor, target=provider_key, metadata=_key_metadata(provider_key)
    )


@receiver(key_signals.provider_keys_disabled_all, dispatch_uid="audit_provider_keys_disabled_all")
def _on_provider_keys_disabled_all(
    sender: Any, org: Organization, actor: Any, provider_keys: list[ProviderKey], **kwargs: Any
) -> None:
    audit_record(
        event=AuditEvent.KEYS_DISABLED_ALL,
        org=org,
        actor=actor,
        target=org,
        metadata={"count": len(provider_keys), "keys": [f"{k.label} ({k.id})" for k in provider_keys]},
    )


@receiver(key_signals.provider_key_decrypt_failed, dispatch_uid="audit_provider_key_decrypt_failed")
def _on_provider_key_decrypt_failed(
    sender: Any,
    org: Organization,
    actor: Any,
    provider_key: ProviderKey,
    kid: int | None,
    retired_kid: bool,
    purpose: str,
    reference: str,
    **kwargs: Any,
) -> None:
    audit_record(
        event=AuditEvent.KEY_DECRYPT_FAILED,
        org=org,
        actor=actor,
        target=provider_key,
        metadata={
            **_key_metadata(provider_key),
            "kid": kid,
            "retired_kid": retired_kid,
            "purpose": purpose,
            "reference": reference,
        },
    )


@receiver(key_signals.provider_keys_rewrapped, dispatch_uid="audit_provider_keys_rewrapped")
def _on_provider_keys_rewrapped(
    sender: Any,
    org: Organization | None,
    actor: Any,
    to_kid: int,
    from_kids: list[int],
    rewrapped: int,
    failed: int,
    **kwargs: Any,
) -> None:
    audit_record(
        event=AuditEvent.KEY_REWRAPPED,
        org=org,
        actor=actor,
        target=org,
        metadata={"to_kid": to_kid, "from_kids": from_kids, "rewrapped": rewrapped, "failed": failed},
    )
