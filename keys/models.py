"""Provider keys: an organization's own OpenAI, Anthropic, Groq or OpenAI-compatible keys, sealed at rest."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone

from keys.crypto import PROVIDER_KEY_AAD_VERSION


class Provider(models.TextChoices):
    OPENAI = "openai", "OpenAI"
    ANTHROPIC = "anthropic", "Anthropic"
    GROQ = "groq", "Groq"
    OPENAI_COMPATIBLE = "openai_compatible", "OpenAI-compatible"


class KeyStatus(models.TextChoices):
    UNCHECKED = "unchecked", "Unchecked"
    VALID = "valid", "Valid"
    RESTRICTED = "restricted", "Valid (restricted)"
    INVALID = "invalid", "Invalid"
    REVOKED = "revoked", "Revoked"


class ProviderKey(models.Model):
    """One provider key of one organization.

    The secret exists here only as ``sealed_secret``: AES-256-GCM ciphertext bound to this row's org, id, provider
    and destination (the normalized ``base_url``; ``keys.crypto``), written by ``keys.services`` before the
    INSERT, so the plaintext never reaches SQL and a ``base_url`` changed in the database makes the key unusable.
    There is deliberately no field, property or method that returns the plaintext: the one way to use a key is
    ``keys.services.provider_key_open``, for one provider call, audited. Revoking wipes the ciphertext and keeps
    the row for the audit trail and usage history.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    org = models.ForeignKey("orgs.Organization", on_delete=models.CASCADE, related_name="provider_keys")
    provider = models.CharField(max_length=32, choices=Provider.choices)
    label = models.CharField(max_length=100)
    # Empty means the provider's official API. Required for openai_compatible (a constraint says so).
    base_url = models.CharField(max_length=500, blank=True, default="")
    sealed_secret = models.TextField(blank=True, editable=False)
    # The keyring kid in the sealed value's header, as a column so the system check and keys_rewrap can find
    # rows by kid without parsing every ciphertext. Null once revoked.
    kid = models.PositiveIntegerField(null=True, blank=True, editable=False)
    # Which associated data sealed the value (keys.crypto: 1 = before the destination joined it, 2 = now), so the
    # re-seal finds old rows without trying to open every ciphertext. Only a hint: the GCM tag decides, and calls
    # always use the current version. The database default 1 marks rows inserted by code that predates the column
    # (a process still running during an upgrade); the application writes 2.
    aad_version = models.PositiveSmallIntegerField(default=PROVIDER_KEY_AAD_VERSION, db_default=1, editable=False)
    last_four = models.CharField(max_length=4, blank=True, editable=False)
    status = models.CharField(max_length=16, choices=KeyStatus.choices, default=KeyStatus.UNCHECKED)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    # Who added it, as text: an API key has no user, and the user may be deleted later.
    created_by_label = models.CharField(max_length=254, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    last_checked_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            # Labels name keys in the UI and in run configuration; a revoked key frees its label.
            models.UniqueConstraint(
                "org",
                Lower("label"),
                condition=~models.Q(status="revoked"),
                name="keys_providerkey_label_unique_per_org",
            ),
            models.CheckConstraint(condition=~models.Q(label__contains="/"), name="keys_providerkey_label_no_slash"),
            models.CheckConstraint(condition=~models.Q(label=""), name="keys_providerkey_label_not_empty"),
            models.CheckConstraint(condition=models.Q(provider__in=Provider.values), name="keys_providerkey_provider"),
            models.CheckConstraint(condition=models.Q(status__in=KeyStatus.values), name="keys_providerkey_status"),
            models.CheckConstraint(
                condition=~models.Q(provider="openai_compatible", base_url=""),
                name="keys_providerkey_compatible_needs_base_url",
            ),
            # Live keys carry a sealed value and its kid; revoked keys carry neither.
            models.CheckConstraint(
                condition=(
                    models.Q(status="revoked", sealed_secret="", kid__isnull=True)
                    | (~models.Q(status="revoked") & ~models.Q(sealed_secret="") & models.Q(kid__isnull=False))
                ),
                name="keys_providerkey_sealed_unless_revoked",
            ),
        ]
        indexes = [
            models.Index(fields=["org", "-created_at"], name="keys_pkey_org_created"),
            models.Index(fields=["kid"], name="keys_pkey_kid"),
        ]

    def __str__(self) -> str:
        return f"{self.label} (…{self.last_four})"

    def __repr__(self) -> str:
        return f"<ProviderKey {self.label!r} …{self.last_four}>"

    @property
    def is_revoked(self) -> bool:
        return self.status == KeyStatus.REVOKED

    @property
    def masked(self) -> str:
        return f"…{self.last_four}" if self.last_four else "…"
