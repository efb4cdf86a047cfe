"""People, organizations, memberships, invitations and org API keys."""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser, BaseUserManager
from django.contrib.auth.models import PermissionsMixin
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone


class UserManager(BaseUserManager["User"]):
    use_in_migrations = True

    def create_user(self, email: str, password: str | None = None, **extra: Any) -> User:
        if not email:
            raise ValueError("An email address is required.")
        user = self.model(email=self.normalize_email(email).lower(), **extra)
        if password:
            user.set_password(password)
        else:
            user.set_unusable_password()
        user.save(using=self._db)
        return user

    def create_superuser(self, email: str, password: str | None = None, **extra: Any) -> User:
        extra.setdefault("is_staff", True)
        extra.setdefault("is_superuser", True)
        return self.create_user(email, password, **extra)


class User(AbstractBaseUser, PermissionsMixin):
    """A person who logs in with an email address. ``is_staff`` marks a Nexus operator, nothing more."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    email = models.EmailField(max_length=254, unique=True)
    name = models.CharField(max_length=150, blank=True)
    is_active = models.BooleanField(default=True)
    is_staff = models.BooleanField(default=False)
    date_joined = models.DateTimeField(default=timezone.now)

    objects: ClassVar[UserManager] = UserManager()

    USERNAME_FIELD = "email"
    EMAIL_FIELD = "email"
    REQUIRED_FIELDS: ClassVar[list[str]] = []

    class Meta:
        constraints = [models.UniqueConstraint(Lower("email"), name="orgs_user_email_ci_unique")]

    def __str__(self) -> str:
        return self.email

    @property
    def display_name(self) -> str:
        return self.name or self.email


class Role(models.TextChoices):
    ADMIN = "admin", "Admin"
    DEVELOPER = "developer", "Developer"


class Organization(models.Model):
    """A tenant. Every org-owned object hangs off one, and is only ever reached through it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=50, unique=True)
    # Optional ceiling on input + output tokens per calendar month (UTC); new runs and proxy calls are refused
    # once it is reached. None means no cap.
    monthly_token_cap = models.PositiveBigIntegerField(null=True, blank=True)
    # Agent runs may execute commands (sandboxed) in their workspace; off: agents only read and write files.
    agents_may_run_commands = models.BooleanField(default=True)
    # The org's own defaults for agent runs' budgets (numbers by name, e.g. {"max_steps": 20}); validated against
    # the deployment's caps by the runs app, which owns agent limits. Empty: the deployment's defaults.
    agent_limits = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    # Set by a CesaFlow operator (Nexus, ``orgs.services.org_suspend``): while set, the API refuses the org
    # (403 ``org_suspended``), its dashboard is read-only and no run starts. Members see the reason.
    suspended_at = models.DateTimeField(null=True, blank=True)
    suspended_reason = models.TextField(blank=True)

    def __str__(self) -> str:
        return self.name

    @property
    def is_suspended(self) -> bool:
        return self.suspended_at is not None


class Membership(models.Model):
    """A user's role in one organization."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    org = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.DEVELOPER)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "org"], name="orgs_membership_unique_user_org"),
            models.CheckConstraint(condition=models.Q(role__in=Role.values), name="orgs_membership_role_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.user_id} in {self.org_id} as {self.role}"


class Invitation(models.Model):
    """A single-use link inviting an email address into an org with a role. Only a hash of the token is kept."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    org = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="invitations")
    email = models.EmailField(max_length=254)
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.DEVELOPER)
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=models.Q(role__in=Role.values), name="orgs_invitation_role_valid"),
        ]

    def __str__(self) -> str:
        return f"invitation {self.id}"

    def is_pending(self, now: Any = None) -> bool:
        now = now or timezone.now()
        return self.accepted_at is None and self.revoked_at is None and self.expires_at > now


class ApiKey(models.Model):
    """An org API key for IDEs and CLIs. The secret is shown once; only its SHA-256 digest is stored.

    Format ``cf_live_<prefix>_<secret>``: the prefix is the public lookup id, the secret is 256 random bits
    (base62) followed by a CRC32 checksum so secret scanners can tell a real key from noise offline.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    org = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True)
    digest = models.CharField(max_length=64)
    last_four = models.CharField(max_length=4)
    scopes = models.JSONField(default=list)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # When its creator lost capabilities (a demotion), the scopes the key lost with them: the key never does more
    # than the person who made it may. Empty and None for a key that was never clipped.
    scopes_clipped_at = models.DateTimeField(null=True, blank=True)
    clipped_scopes = models.JSONField(default=list, blank=True)

    class Meta:
        indexes = [models.Index(fields=["org", "-created_at"], name="orgs_apikey_org_created")]

    def __str__(self) -> str:
        return f"{self.name} (…{self.last_four})"

    def __repr__(self) -> str:
        return f"<ApiKey {self.id} prefix={self.prefix}>"

    def is_active(self, now: Any = None) -> bool:
        now = now or timezone.now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    @property
    def masked(self) -> str:
        return f"cf_live_{self.prefix}_…{self.last_four}"


class SignupConfirmation(models.Model):
    """The pending confirmation of a self-service sign-up. The account (and its first org) stays inactive until the
    single-use link mailed to its address is opened; only a hash of the token is kept. The row is deleted when the
    sign-up is confirmed, and the whole sign-up when it expires unconfirmed."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    org = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"signup confirmation {self.id}"

    def is_pending(self, now: Any = None) -> bool:
        return self.expires_at > (now or timezone.now())


# Who acts in a service call: a person, an org API key, a label naming someone outside the org (a CesaFlow operator
# acting from Nexus: "CesaFlow operator (<email>)"; it grants no capability), or None (whoever runs the
# installation, via a management command).
Actor = User | ApiKey | str | None


def actor_label(actor: Actor) -> str:
    """How an actor is named in audit rows and "created by" snapshots, which outlive the user or key."""
    if isinstance(actor, User):
        return actor.email
    if isinstance(actor, ApiKey):
        return f"API key {actor.name} ({actor.masked})"
    if isinstance(actor, str):
        return actor
    return ""
