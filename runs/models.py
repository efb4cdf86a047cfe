"""Runs, the usage ledger and the audit trail. None of them has a column for prompts or responses."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone


class AuditEvent(models.Model):
    """One thing that happened: who (a user or an org API key, set by the server), what, to which object, from
    where and when. Append-only; kept ``AUDIT_RETENTION_DAYS`` (``manage.py purge_audit``). Never a secret."""

    # The registry of event names: code refers to these constants, never to string literals.
    USER_SIGNED_UP = "user.signed_up"
    USER_SIGNUP_CONFIRMED = "user.signup_confirmed"
    ORG_CREATED = "org.created"
    LOGIN_SUCCEEDED = "auth.login_succeeded"
    LOGIN_FAILED = "auth.login_failed"
    LOGIN_LOCKED_OUT = "auth.locked_out"
    LOGGED_OUT = "auth.logged_out"
    SESSION_REVOKED = "auth.session_revoked"
    SIGNED_OUT_EVERYWHERE = "auth.signed_out_everywhere"
    PASSWORD_CHANGED = "auth.password_changed"  # noqa: S105 (an event name)
    ORG_SETTINGS_CHANGED = "org.settings_changed"
    # A CesaFlow operator's actions (Nexus); the actor is "CesaFlow operator (<email>)". The operators' other
    # actions (revoking keys, setting the token cap) record the usual events with that actor.
    ORG_SUSPENDED = "org.suspended"
    ORG_REACTIVATED = "org.reactivated"
    USER_DISABLED = "user.disabled"
    USER_ENABLED = "user.enabled"
    LOGIN_UNLOCKED = "auth.unlocked"
    INVITATION_SENT = "invitation.sent"
    INVITATION_REVOKED = "invitation.revoked"
    INVITATION_ACCEPTED = "invitation.accepted"
    MEMBER_ROLE_CHANGED = "member.role_changed"
    MEMBER_REMOVED = "member.removed"
    API_KEY_CREATED = "api_key.created"
    API_KEY_REVOKED = "api_key.revoked"
    API_KEY_SCOPES_CLIPPED = "api_key.scopes_clipped"
    KEY_CREATED = "key.created"
    KEY_CHECKED = "key.checked"
    KEY_USED = "key.used"
    KEY_REVOKED = "key.revoked"
    KEY_REWRAPPED = "key.rewrapped"
    KEY_DECRYPT_FAILED = "key.decrypt_failed"
    KEYS_DISABLED_ALL = "key.disabled_all"
    PROJECT_CREATED = "project.created"
    PROJECT_UPDATED = "project.updated"
    PROJECT_DELETED = "project.deleted"
    GITHUB_CONNECTED = "project.github_connected"
    GITHUB_SECRET_ROTATED = "project.github_secret_rotated"  # noqa: S105 - an event name, not a secret
    GITHUB_DISCONNECTED = "project.github_disconnected"
    WEBHOOK_SIGNATURE_FAILED = "webhook.signature_failed"
    WEBHOOK_RUN_STARTED = "webhook.run_started"

    EVENTS = (
        USER_SIGNED_UP,
        USER_SIGNUP_CONFIRMED,
        ORG_CREATED,
        LOGIN_SUCCEEDED,
        LOGIN_FAILED,
        LOGIN_LOCKED_OUT,
        LOGGED_OUT,
        SESSION_REVOKED,
        SIGNED_OUT_EVERYWHERE,
        PASSWORD_CHANGED,
        ORG_SETTINGS_CHANGED,
        ORG_SUSPENDED,
        ORG_REACTIVATED,
        USER_DISABLED,
        USER_ENABLED,
        LOGIN_UNLOCKED,
        INVITATION_SENT,
        INVITATION_REVOKED,
        INVITATION_ACCEPTED,
        MEMBER_ROLE_CHANGED,
        MEMBER_REMOVED,
        API_KEY_CREATED,
        API_KEY_REVOKED,
        API_KEY_SCOPES_CLIPPED,
        KEY_CREATED,
        KEY_CHECKED,
        KEY_USED,
        KEY_REVOKED,
        KEY_REWRAPPED,
        KEY_DECRYPT_FAILED,
        KEYS_DISABLED_ALL,
        PROJECT_CREATED,
        PROJECT_UPDATED,
        PROJECT_DELETED,
        GITHUB_CONNECTED,
        GITHUB_SECRET_ROTATED,
        GITHUB_DISCONNECTED,
        WEBHOOK_SIGNATURE_FAILED,
        WEBHOOK_RUN_STARTED,
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


class WorkspaceState(models.TextChoices):
    """Where an agent run's workspace is in its life (metadata only; the files live on disk until deleted)."""

    NONE = "", "No workspace"
    LIVE = "live", "In use"
    AVAILABLE = "available", "Ready to download"
    DOWNLOADING = "downloading", "Being downloaded"
    DOWNLOADED = "downloaded", "Downloaded and deleted"
    EXPIRED = "expired", "Expired and deleted"


class RunKind(models.TextChoices):
    CHAT = "chat", "Chat"
    COMPLETION = "completion", "Completion (proxy)"
    AGENT = "agent", "Agent"


class RunStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


TERMINAL_STATUSES = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})


class Project(models.Model):
    """A named, ongoing piece of work with one persistent workspace: agent runs on it build on what earlier runs
    left. Its runs are serialized (one at a time); deleting it deletes its workspace at once and keeps the runs'
    metadata. A GitHub repository can be connected so webhook deliveries start runs on it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    org = models.ForeignKey("orgs.Organization", on_delete=models.CASCADE, related_name="projects")
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True, max_length=2000)
    default_provider_key = models.ForeignKey(
        "keys.ProviderKey", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    default_model = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_by_label = models.CharField(max_length=254, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    # Measured after each run (metadata: a size, never content).
    workspace_bytes = models.PositiveBigIntegerField(default=0)
    last_run_at = models.DateTimeField(null=True, blank=True)
    # GitHub: the connected repository ("owner/name"), the webhook secret sealed like a provider key (the current
    # one and, during a rotation, the previous one), the label that starts a run, and when the secret was rotated.
    github_repository = models.CharField(max_length=200, blank=True)
    github_secret_sealed = models.TextField(blank=True, editable=False)
    github_previous_secret_sealed = models.TextField(blank=True, editable=False)
    github_secret_rotated_at = models.DateTimeField(null=True, blank=True)
    github_label = models.CharField(max_length=50, blank=True, default="cesaflow")

    class Meta:
        constraints = [
            models.UniqueConstraint("org", Lower("name"), name="runs_project_name_unique_per_org"),
        ]

    def __str__(self) -> str:
        return f"project {self.id}"

    @property
    def github_connected(self) -> bool:
        return bool(self.github_repository and self.github_secret_sealed)


class WebhookDelivery(models.Model):
    """One GitHub delivery to a project's hook, remembered (id, event, outcome; never the payload) so a replay or a
    redelivery starts nothing twice. ``body_sha256`` tells a redelivery (same body) from a forgery (same id, other
    body). Kept ``WEBHOOK_DELIVERY_RETENTION_DAYS``, beyond GitHub's redelivery window."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="deliveries")
    delivery_id = models.CharField(max_length=100)
    event = models.CharField(max_length=50)
    action = models.CharField(max_length=50, blank=True)
    body_sha256 = models.CharField(max_length=64)
    outcome = models.CharField(max_length=32)  # run_started, ignored, pong
    reason = models.CharField(max_length=200, blank=True)
    run = models.ForeignKey("Run", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    received_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "delivery_id"], name="runs_webhookdelivery_unique_id"),
        ]
        indexes = [models.Index(fields=["project", "-received_at"], name="runs_delivery_project_recv")]

    def __str__(self) -> str:
        return f"delivery {self.delivery_id} ({self.outcome})"


class Run(models.Model):
    """One piece of AI work done with one of the org's provider keys: metadata and token counts only.

    The objective is what the user asked for (it is the run's title, shown in lists); the model's answer is
    streamed to whoever watches and never stored. Completions from the OpenAI-compatible proxy have no objective.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    org = models.ForeignKey("orgs.Organization", on_delete=models.CASCADE, related_name="runs")
    kind = models.CharField(max_length=16, choices=RunKind.choices)
    objective = models.TextField(blank=True)
    provider_key = models.ForeignKey(
        "keys.ProviderKey", on_delete=models.SET_NULL, null=True, blank=True, related_name="runs"
    )
    provider = models.CharField(max_length=32)
    model = models.CharField(max_length=200)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    # A short machine kind (auth, rate_limit, incomplete, worker_lost, …) and our own one-line explanation; never
    # provider content.
    error_kind = models.CharField(max_length=32, blank=True)
    error_message = models.CharField(max_length=300, blank=True)
    created_by_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_by_api_key = models.ForeignKey(
        "orgs.ApiKey", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_by_label = models.CharField(max_length=254, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    # False when the provider never reported final usage (an interrupted stream): the counts are lower bounds.
    usage_complete = models.BooleanField(default=False)
    # Executor bookkeeping: who runs it, proof of life, and a cancellation request any process can set.
    worker_id = models.CharField(max_length=64, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    # An agent run on a named project works in the project's persistent workspace (never downloaded-and-deleted).
    project = models.ForeignKey(Project, on_delete=models.SET_NULL, null=True, blank=True, related_name="runs")
    # Start on attach: a watched run stays queued until its stream is attached (``attached_at``), so an answer that
    # is never stored is never streamed to nobody. An unwatched run (``watch`` false) starts at once.
    watch = models.BooleanField(default=True)
    attached_at = models.DateTimeField(null=True, blank=True)
    # Agent runs: the budgets this run had (numbers only), how its commands were sandboxed, and its workspace's
    # life. The workspace is deleted by the first complete download or at ``workspace_expires_at``.
    limits = models.JSONField(default=dict, blank=True)
    sandbox_mode = models.CharField(max_length=16, blank=True)
    workspace_state = models.CharField(max_length=16, choices=WorkspaceState.choices, blank=True, default="")
    workspace_expires_at = models.DateTimeField(null=True, blank=True)
    workspace_deleted_at = models.DateTimeField(null=True, blank=True)
    # While ``downloading``: until when the download holds the workspace (renewed as it streams; a download whose
    # client vanished without a trace lets go when this passes).
    workspace_lease_until = models.DateTimeField(null=True, blank=True)
    # Tokens this run holds against its org's monthly cap until its calls report what they really used
    # (``TokenBudget``), and the month (its first day) whose budget holds them.
    tokens_reserved = models.PositiveBigIntegerField(default=0)
    tokens_reserved_month = models.DateField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["org", "-created_at"], name="runs_run_org_created"),
            models.Index(fields=["status", "created_at"], name="runs_run_status_created"),
            # Per-org counts of queued and running runs (caps, fair claiming) read only this small part of the table.
            models.Index(
                fields=["org", "status"],
                condition=models.Q(status__in=[RunStatus.QUEUED, RunStatus.RUNNING]),
                name="runs_run_org_active",
            ),
        ]
        constraints = [
            models.CheckConstraint(condition=models.Q(status__in=RunStatus.values), name="runs_run_status_valid"),
            models.CheckConstraint(condition=models.Q(kind__in=RunKind.values), name="runs_run_kind_valid"),
        ]

    def __str__(self) -> str:
        return f"run {self.id} ({self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def waiting_for_watcher(self) -> bool:
        """Queued only because nobody has attached to its stream yet."""
        return self.status == RunStatus.QUEUED and self.watch and self.attached_at is None


class UsageRecord(models.Model):
    """The usage ledger: one row per provider call, append-only, for usage pages and billing."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    org = models.ForeignKey("orgs.Organization", on_delete=models.CASCADE, related_name="usage_records")
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="usage_records")
    provider = models.CharField(max_length=32)
    model = models.CharField(max_length=200)
    input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    complete = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["org", "created_at"], name="runs_usage_org_created")]

    def __str__(self) -> str:
        return f"usage {self.input_tokens}+{self.output_tokens} for run {self.run_id}"


class TokenBudget(models.Model):
    """An org's tokens in one calendar month (UTC): what its provider calls used (the ledger's total, kept in step
    by ``run_finish`` and ``run_usage_add``) and what calls in flight may still spend (``reserved``).

    The monthly cap is enforced here, not by summing the ledger: a call reserves its estimate with one conditional
    UPDATE of this row (``used + reserved + estimate <= cap``), so parallel calls cannot together pass the cap.
    Counts only."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    org = models.ForeignKey("orgs.Organization", on_delete=models.CASCADE, related_name="token_budgets")
    month = models.DateField()  # the first day of the month
    used = models.PositiveBigIntegerField(default=0)
    reserved = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["org", "month"], name="runs_tokenbudget_unique_month")]

    def __str__(self) -> str:
        return f"tokens of {self.month:%Y-%m}: {self.used} used, {self.reserved} reserved"
