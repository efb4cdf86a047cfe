"""Nexus: the installation's operators and their own audit trail. Operators are not dashboard users (``orgs.User``)
and belong to no organization; the two kinds of account never open each other's front door."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.db import models
from django.utils import timezone


class OperatorRole(models.TextChoices):
    SUPPORT = "support", "Support (read-only)"
    ADMIN = "admin", "Admin (may act)"


class Operator(AbstractBaseUser):
    """An operator of this installation. Password: Django's hashers (bcrypt, like users). Second factor: a TOTP
    secret sealed with the provider keyring (``totp_sealed``, bound to this row), required at every sign-in."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    email = models.EmailField(max_length=254, unique=True)
    name = models.CharField(max_length=150, blank=True)
    role = models.CharField(max_length=16, choices=OperatorRole.choices, default=OperatorRole.SUPPORT)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    # TOTP: the sealed secret (empty until enrolled), when enrolment finished, and the last time step accepted
    # (a code is good once: replaying it within its window is refused).
    totp_sealed = models.TextField(blank=True, editable=False)
    totp_enrolled_at = models.DateTimeField(null=True, blank=True)
    totp_last_step = models.BigIntegerField(default=0)
    # The one-time enrolment link's token, as a SHA-256 digest, and until when it works.
    enrolment_token_hash = models.CharField(max_length=64, blank=True, editable=False)
    enrolment_expires_at = models.DateTimeField(null=True, blank=True)

    USERNAME_FIELD = "email"
    EMAIL_FIELD = "email"

    class Meta:
        constraints = [
            models.CheckConstraint(condition=models.Q(role__in=OperatorRole.values), name="nexus_operator_role_valid"),
        ]

    def __str__(self) -> str:
        return self.email

    def __repr__(self) -> str:
        return f"<Operator {self.id} {self.role}>"

    @property
    def may_act(self) -> bool:
        return self.role == OperatorRole.ADMIN

    @property
    def label(self) -> str:
        """How the operator is named in an organization's audit trail."""
        return f"CesaFlow operator ({self.email})"

    # What Django's admin asks of ``request.user`` on Nexus pages. Permissions are view-only for every registered
    # model: Nexus changes nothing through admin forms, only through explicit, audited actions (nexus.actions).

    @property
    def is_staff(self) -> bool:
        return True

    @property
    def is_superuser(self) -> bool:
        return False

    def get_short_name(self) -> str:
        return self.name or self.email

    def get_full_name(self) -> str:
        return self.name or self.email

    def has_perm(self, perm: str, obj: object = None) -> bool:
        """``app_label.view_model``: yes (while active); add, change, delete and anything else: no."""
        _app_label, _, codename = perm.partition(".")
        return self.is_active and codename.startswith("view_")

    def has_perms(self, perm_list: Iterable[str], obj: object = None) -> bool:
        return all(self.has_perm(perm, obj) for perm in perm_list)

    def has_module_perms(self, app_label: str) -> bool:
        return self.is_active


class InstallationEvent(models.Model):
    """The installation audit trail: operators' sign-ins, failures and sign-outs, and every action they take.
    Append-only; kept as long as the organizations' trails (``AUDIT_RETENTION_DAYS``)."""

    id = models.BigAutoField(primary_key=True)
    at = models.DateTimeField(default=timezone.now, db_index=True)
    event = models.CharField(max_length=64)
    operator = models.ForeignKey(Operator, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    operator_label = models.CharField(max_length=254, blank=True)  # outlives the operator row
    org = models.ForeignKey("orgs.Organization", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    target_type = models.CharField(max_length=64, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    reason = models.TextField(blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=256, blank=True)
    metadata = models.JSONField(default=dict, blank=True)

    class Meta:
        indexes = [models.Index(fields=["-at", "-id"], name="nexus_event_at")]

    def __str__(self) -> str:
        return f"{self.event} by {self.operator_label or 'unknown'}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None and not kwargs.get("force_insert"):
            raise ValueError("The installation audit trail is append-only.")
        super().save(*args, **kwargs)
