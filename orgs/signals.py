"""Domain signals sent by orgs services, in the transaction of the change.

``runs`` records them in the audit trail (orgs never imports runs). Every signal carries ``org`` (may be None
for an event that belongs to no org yet), ``actor`` (a User, an ApiKey or None) and the changed object.
Django's own ``user_logged_in`` / ``user_logged_out`` / ``user_login_failed`` cover the rest of auth.
"""

from django.dispatch import Signal

user_signed_up = Signal()  # org, actor=user, user (self-service: the account is inactive until confirmed)
signup_confirmed = Signal()  # org, actor=user, user
org_created = Signal()  # org, actor=user (its first Admin)
login_locked_out = Signal()  # org=None, actor=None, email, scope ("account" | "ip")
org_settings_changed = Signal()  # org, actor, changes: dict[field, [old, new]]
# Sent by orgs.moderation (CesaFlow operators' actions; actor is the operator's label):
org_suspended = Signal()  # org, actor, reason
org_reactivated = Signal()  # org, actor, reason (the suspension's, for the record)
user_disabled = Signal()  # org=None, actor, user, sessions_ended: int (the receiver records it in each of their orgs)
user_enabled = Signal()  # org=None, actor, user
login_unlocked = Signal()  # org=None, actor, email, was_locked: bool
invitation_sent = Signal()  # org, actor, invitation
invitation_revoked = Signal()  # org, actor, invitation
invitation_accepted = Signal()  # org, actor=user, invitation, membership
member_role_changed = Signal()  # org, actor, membership, old_role
member_removed = Signal()  # org, actor, membership
api_key_created = Signal()  # org, actor, api_key
api_key_revoked = Signal()  # org, actor, api_key
api_key_scopes_clipped = Signal()  # org, actor, api_key, removed_scopes: list[str] (its creator was demoted)
session_revoked = Signal()  # org=None, actor=user, user, device, count=1 (one session ended from the Sessions page)
# reason: "signed_out_everywhere" | "password_changed" | "user_disabled" (recorded by ``user_disabled`` instead)
sessions_ended = Signal()  # org=None, actor, user, count, reason
