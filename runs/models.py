"""Runs and the audit trail. (Runs and the usage ledger arrive with the provider work.)"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone


class AuditEvent(models.Model):
    """One thing that happened: who (a user or an org API key, set by the server), what, to which object, from
    where and when. Append-only; kept ``AUDIT_RETENTION_DAYS`` (``manage.py purge_audit``). Never a secret."""

    # The registry of event names: code refers to these constants, never to string literals.
    USER_SIGNED_UP = "user.signed_up"
    LOGIN_SUCCEEDED = "auth.login_succeeded"
    LOGIN_FAILED = "auth.login_failed"
    LOGIN_LOCKED_OUT = "auth.locked_out"
    LOGGED_OUT = "auth.logged_out"
    ORG_SETTINGS_CHANGED = "org.settings_changed"
    INVITATION_SENT = "invitation.sent"
    INVITATION_REVOKED = "invitation.revoked"
    INVITATION_ACCEPTED = "invitation.accepted"
    MEMBER_ROLE_CHANGED = "member.role_changed"
    MEMBER_REMOVED = "member.removed"
    API_KEY_CREATED = "api_key.created"
    API_KEY_REVOKED = "api_key.revoked"
    KEY_CREATED = "key.created"
    KEY_CHECKED = "key.checked"
    KEY_USED = "key.used"
    KEY_REVOKED = "key.revoked"
    KEY_REWRAPPED = "key.rewrapped"
    KEY_DECRYPT_FAILED = "key.decrypt_failed"
    KEYS_DISABLED_ALL = "key.disabled_all"

    EVENTS = (
        USER_SIGNED_UP,
        LOGIN_SUCCEEDED,
        LOGIN_FAILED,
        LOGIN_LOCKED_OUT,
        LOGGED_OUT,
        ORG_SETTINGS_CHANGED,
        INVITATION_SENT,
        INVITATION_REVOKED,
        INVITATION_ACCEPTED,
        MEMBER_ROLE_CHANGED,
        MEMBER_REMOVED,
        API_KEY_CREATED,
        API_KEY_REVOKED,
        KEY_CREATED,
        KEY_CHECKED,
        KEY_USED,
        KEY_REVOKED,
        KEY_REWRAPPED,
        KEY_DECRYPT_FAILED,
        KEYS_DISABLED_ALL,
    )

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    org = models.ForeignKey(
        "orgs.Organization", on_delete=models.CASCADE, null=True, blank=True, related_name="audit_events"
    )
    event = models.CharField(max_length=64, db_index=True)
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    actor_api_key = models.ForeignKey("orgs.ApiKey", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    # A snapshot of who acted, so the trail still reads after the user or key is gone.
    actor_label = models.CharField(max_length=254, blank=True)
    target_type = models.CharField(max_length=64, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=256, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        indexes = [models.Index(fields=["org", "-created_at"], name="runs_audit_org_created")]

    def __str__(self) -> str:
        return f"{self.event} at {self.created_at:%Y-%m-%d %H:%M:%S}"

    @property
    def actor_kind(self) -> str:
        if self.actor_api_key_id:
            return "api_key"
        if self.actor_user_id:
            return "user"
        return "system" if not self.actor_label else "anonymous"
