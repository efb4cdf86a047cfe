"""Writes for GitHub webhooks: connect a repository, rotate and wipe the secret, receive a verified delivery (replay
guard, event → agent run), refuse a forged one, and purge old delivery records.

The permission check (``PROJECTS_MANAGE``, Admins) belongs to the callers (API and dashboard views), like the other
project services; these functions take a project already resolved in the caller's org.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, Literal

from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from keys.crypto import DecryptionError, Secret
from orgs.models import Actor
from runs.audit import audit_record
from runs.models import AuditEvent, Project, WebhookDelivery
from runs.projects.services import project_run_create
from runs.webhooks import github
from runs.webhooks.secrets import webhook_secret_generate, webhook_secret_open, webhook_secret_seal

logger = logging.getLogger(__name__)

# Defaults of the two settings this package reads (at call time, STYLE rule 14).
DEFAULT_MAX_BODY_BYTES: Final = 1_048_576
DEFAULT_DELIVERY_RETENTION_DAYS: Final = 30
# GitHub lets a repository admin redeliver deliveries of the past 3 days (with the same X-GitHub-Delivery); a
# delivery id forgotten sooner than that could start its run a second time.
REDELIVERY_WINDOW_DAYS: Final = 3

LABEL_MAX_CHARS: Final = 50
REASON_MAX_CHARS: Final = 200
SIGNATURE_FAILURE_AUDIT_SECONDS: Final = 60
WEBHOOK_ACTOR: Final = "GitHub webhook"

# GitHub's naming rules: an account (user or organization) is 1-39 letters, digits and hyphens, not starting with a
# hyphen (Enterprise Managed Users add an "_shortcode" suffix); a repository is 1-100 letters, digits, '.', '-', '_'.
_OWNER_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,38}")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,100}")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")

Outcome = Literal["pong", "run_started", "ignored", "duplicate", "conflict"]


def webhook_max_body_bytes() -> int:
    """The largest delivery body accepted (``WEBHOOK_MAX_BODY_BYTES``, default 1 MiB)."""
    return int(getattr(settings, "WEBHOOK_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES))


def webhook_delivery_retention_days() -> int:
    """How long delivery ids are remembered (``WEBHOOK_DELIVERY_RETENTION_DAYS``, default 30)."""
    return int(getattr(settings, "WEBHOOK_DELIVERY_RETENTION_DAYS", DEFAULT_DELIVERY_RETENTION_DAYS))


def webhook_label(*, repository: str) -> str:
    """How a run started by a delivery is attributed ("created by" and the audit trail's actor)."""
    return f"{WEBHOOK_ACTOR} ({repository})"


# --- Connecting a repository ---------------------------------------------------------------------------------


def clean_repository(repository: str) -> str:
    """``owner/name`` as GitHub allows it (case kept: it is how the admin wrote it; matching ignores case)."""
    repository = (repository or "").strip()
    owner, slash, name = repository.partition("/")
    valid = (
        slash == "/"
        and _OWNER_RE.fullmatch(owner) is not None
        and _NAME_RE.fullmatch(name) is not None
        and name not in {".", ".."}
        and not name.lower().endswith(".git")
    )
    if not valid:
        raise ValidationError(
            {"repository": "Give the repository as owner/name, as in https://github.com/owner/name."},
            code="invalid",
        )
    return repository


def clean_label(label: str) -> str:
    label = (label or "").strip()
    if not label or len(label) > LABEL_MAX_CHARS or _CONTROL.search(label):
        raise ValidationError({"label": f"Give the label that starts a run (1 to {LABEL_MAX_CHARS} characters)."})
    return label


def _lock(project: Project) -> Project:
    return Project.objects.select_for_update().get(pk=project.pk)


def _save_github_fields(project: Project, locked: Project) -> None:
    """Save the GitHub fields of ``locked`` and mirror them onto the caller's instance."""
    fields = [
        "github_repository",
        "github_secret_sealed",
        "github_previous_secret_sealed",
        "github_secret_rotated_at",
        "github_label",
        "updated_at",
    ]
    locked.updated_at = timezone.now()
    locked.save(update_fields=fields)
    for name in fields:
        setattr(project, name, getattr(locked, name))


@transaction.atomic
def project_github_connect(*, project: Project, actor: Actor, repository: str, label: str = "cesaflow") -> str:
    """Connect ``repository`` (``owner/name``) to the project with a new webhook secret and return the secret, in
    plaintext, for the one display that shows it. Connecting again replaces the secret (the old ones stop working
    at once) and the repository. Runs start on issues labeled ``label``."""
    repository = clean_repository(repository)
    label = clean_label(label)
    locked = _lock(project)
    replaced = locked.github_connected
    secret = webhook_secret_generate()
    # Sealed before it touches the model: the plaintext never reaches SQL, not even in the WAL.
    locked.github_secret_sealed = webhook_secret_seal(org_id=locked.org_id, project_id=locked.id, secret=secret)
    locked.github_previous_secret_sealed = ""
    locked.github_secret_rotated_at = None
    locked.github_repository = repository
    locked.github_label = label
    _save_github_fields(project, locked)
    audit_record(
        event=AuditEvent.GITHUB_CONNECTED,
        org=locked.org,
        actor=actor,
        target=locked,
        metadata={"repository": repository, "label": label, "replaced": replaced},
    )
    return secret.reveal()


@transaction.atomic
def project_github_rotate(*, project: Project, actor: Actor) -> str:
    """A new webhook secret, returned in plaintext once. The current secret becomes the previous one and keeps
    verifying deliveries for ``ROTATION_GRACE`` (time to paste the new one into GitHub); the one before goes."""
    locked = _lock(project)
    if not locked.github_connected:
        raise ValidationError("Connect a GitHub repository before rotating its secret.", code="not_connected")
    secret = webhook_secret_generate()
    locked.github_previous_secret_sealed = locked.github_secret_sealed
    locked.github_secret_sealed = webhook_secret_seal(org_id=locked.org_id, project_id=locked.id, secret=secret)
    locked.github_secret_rotated_at = timezone.now()
    _save_github_fields(project, locked)
    audit_record(
        event=AuditEvent.GITHUB_SECRET_ROTATED,
        org=locked.org,
        actor=actor,
        target=locked,
        metadata={"repository": locked.github_repository},
    )
    return secret.reveal()


@transaction.atomic
def project_github_disconnect(*, project: Project, actor: Actor) -> None:
    """Forget the repository and wipe both sealed secrets: every later delivery gets 401. Idempotent (nothing to
    wipe: nothing is recorded). The delivery records stay until they age out."""
    locked = _lock(project)
    if not (locked.github_repository or locked.github_secret_sealed or locked.github_previous_secret_sealed):
        return
    repository = locked.github_repository
    locked.github_repository = ""
    locked.github_secret_sealed = ""
    locked.github_previous_secret_sealed = ""
    locked.github_secret_rotated_at = None
    _save_github_fields(project, locked)
    audit_record(
        event=AuditEvent.GITHUB_DISCONNECTED,
        org=locked.org,
        actor=actor,
        target=locked,
        metadata={"repository": repository},
    )


# --- Verifying a delivery ------------------------------------------------------------------------------------


# How long the previous secret is still accepted after a rotation.
ROTATION_GRACE = timedelta(hours=24)


def project_webhook_secrets(*, project: Project) -> list[Secret]:
    """The secrets a delivery to ``project`` may be signed with: the current one and, during a rotation, the
    previous one. A sealed value that does not open (keyring misconfigured, tampered row) is left out and logged
    for operators, without the value; a project that is not connected has none."""
    if not project.github_connected:
        return []
    opened = []
    candidates = [project.github_secret_sealed]
    rotated = project.github_secret_rotated_at
    # The previous secret only bridges the rotation (time to paste the new one into GitHub): after
    # ROTATION_GRACE it is refused, so rotating a leaked secret really retires it.
    if rotated is not None and timezone.now() - rotated < ROTATION_GRACE:
        candidates.append(project.github_previous_secret_sealed)
    for sealed in candidates:
        if not sealed:
            continue
        try:
            opened.append(webhook_secret_open(org_id=project.org_id, project_id=project.id, sealed=sealed))
        except DecryptionError as exc:
            logger.warning(
                "project %s: a webhook secret could not be opened (retired kid: %s)", project.id, exc.retired_kid
            )
    return opened


_failures: Counter[str] = Counter()
_failures_lock = threading.Lock()


def signature_failure_counts() -> dict[str, int]:
    """Refused deliveries of this process, by kind (``unknown_project``, ``not_connected``, ``secret_unavailable``,
    ``missing``, ``malformed``, ``mismatch``): the counter behind the rate-limited audit event."""
    with _failures_lock:
        return dict(_failures)


def webhook_signature_failed(*, project: Project | None, kind: str) -> None:
    """Count a refused delivery and log its kind only (never the body, the headers or the project's secret). A
    known project also gets a ``webhook.signature_failed`` audit event, at most one per minute: a flood of forged
    deliveries must not become a flood of audit rows."""
    with _failures_lock:
        _failures[kind] += 1
    logger.warning("webhook delivery refused: %s", kind)
    if project is None:
        return  # no org to tell, and no cache key per guessed id
    try:
        first_this_minute = cache.add(
            f"webhooks:signature-failed:{project.id}", 1, timeout=SIGNATURE_FAILURE_AUDIT_SECONDS
        )
    except Exception as exc:  # the cache is down: skip the audit row rather than write one per forged delivery
        logger.warning("webhook signature audit skipped: cache unavailable (%s)", type(exc).__name__)
        return
    if first_this_minute:
        audit_record(
            event=AuditEvent.WEBHOOK_SIGNATURE_FAILED,
            org=project.org,
            actor=WEBHOOK_ACTOR,
            target=project,
            metadata={"kind": kind, "window_seconds": SIGNATURE_FAILURE_AUDIT_SECONDS},
        )


# --- Receiving a verified delivery ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryOutcome:
    """What became of a verified delivery: the ``status`` the hook answers with, a ``reason`` when it was ignored,
    and the run it started."""

    status: Outcome
    reason: str = ""
    run_id: uuid.UUID | None = None


def _reason(text: str) -> str:
    return _CONTROL.sub(" ", text).strip()[:REASON_MAX_CHARS]


def _validation_message(exc: ValidationError) -> str:
    # The reason goes back to GitHub, where everyone who can read the repository's delivery log sees it: the
    # organization's token usage is not theirs to read.
    if getattr(exc, "code", None) == "token_cap_reached":
        return "The organization's monthly token cap is reached."
    return " ".join(str(message) for message in exc.messages) or "The run could not be started."


def _replay(project: Project, delivery_id: str, body_sha256: str) -> DeliveryOutcome | None:
    """A delivery id seen before: the same body is a redelivery (no-op), another body is a forgery or a bug."""
    stored = (
        WebhookDelivery.objects.filter(project=project, delivery_id=delivery_id)
        .values_list("body_sha256", flat=True)
        .first()
    )
    if stored is None:
        return None
    if stored == body_sha256:
        return DeliveryOutcome("duplicate")
    logger.warning("project %s: delivery id reused with another body", project.id)
    return DeliveryOutcome("conflict", reason="This delivery id was already received with another body.")


def _act(project: Project, *, event: str, action: str, delivery_id: str, payload: Mapping[str, Any]) -> DeliveryOutcome:
    if not project.github_connected:
        # Disconnected between the signature check and the lock: the delivery was genuine but is no longer wanted.
        return DeliveryOutcome("ignored", reason="The project is no longer connected to GitHub.")
    intent = github.interpret(
        event=event,
        payload=payload,
        repository=project.github_repository,
        label=project.github_label,
        # Anything older than the ids we still remember could be a replay under a fresh id.
        not_before=timezone.now() - timedelta(days=webhook_delivery_retention_days()),
    )
    if intent.kind == "pong":
        return DeliveryOutcome("pong")
    if intent.kind == "ignored":
        return DeliveryOutcome("ignored", reason=_reason(intent.reason))
    label = webhook_label(repository=project.github_repository)
    try:
        # Unwatched: nobody is there to attach a stream, the run starts as soon as the project is free.
        run = project_run_create(project=project, actor=None, objective=intent.objective, watch=False, label=label)
    except ValidationError as exc:
        # No default key or model, token cap reached, objective too long…: GitHub is answered and the reason kept.
        return DeliveryOutcome("ignored", reason=_reason(_validation_message(exc)))
    audit_record(
        event=AuditEvent.WEBHOOK_RUN_STARTED,
        org=project.org,
        actor=label,
        target=run,
        metadata={
            "project": str(project.id),
            "repository": project.github_repository,
            "event": event,
            "action": action,
            "delivery_id": delivery_id,
        },
    )
    return DeliveryOutcome("run_started", run_id=run.id)


@transaction.atomic
def _receive(
    *, project_id: uuid.UUID, delivery_id: str, event: str, payload: Mapping[str, Any], body_sha256: str
) -> DeliveryOutcome:
    # One delivery of a project at a time: with the row locked, "seen this id or this body?" and the insert that
    # records it cannot interleave with a concurrent copy of the same delivery. NO KEY UPDATE leaves runs free to
    # reference the project meanwhile.
    project = (
        Project.objects.select_for_update(no_key=True, of=("self",))
        .select_related("org", "default_provider_key")
        .filter(id=project_id)
        .first()
    )
    if project is None:
        return DeliveryOutcome("ignored", reason="The project no longer exists.")
    replay = _replay(project, delivery_id, body_sha256)
    if replay is not None:
        return replay
    action = github.delivery_action(payload)
    # The signature covers the body but not the delivery id: a captured delivery resent under a fresh id has the
    # same body, and starts nothing either (security.md §0.4).
    earlier = (
        WebhookDelivery.objects.filter(project=project, body_sha256=body_sha256)
        .values_list("delivery_id", flat=True)
        .first()
    )
    if earlier is not None:
        outcome = DeliveryOutcome("duplicate", reason=_reason(f"Same body as delivery {earlier}."))
    else:
        outcome = _act(project, event=event, action=action, delivery_id=delivery_id, payload=payload)
    WebhookDelivery.objects.create(
        project=project,
        delivery_id=delivery_id,
        event=github.clean_metadata(event),
        action=action,
        body_sha256=body_sha256,
        outcome=outcome.status,
        reason=outcome.reason,
        run_id=outcome.run_id,
    )
    return outcome


def webhook_delivery_receive(
    *, project_id: uuid.UUID, delivery_id: str, event: str, payload: Mapping[str, Any], body_sha256: str
) -> DeliveryOutcome:
    """Record a delivery whose signature was verified and act on it, in one transaction: a run it starts is handed
    to the executor only once the delivery id that claims it is committed.

    Replays start nothing: the same ``delivery_id`` with the same body → ``duplicate``; with another body →
    ``conflict`` (nothing recorded); another id with a body already seen → ``duplicate`` (recorded). The payload
    itself is never stored: only id, event, action, body digest, outcome and reason."""
    try:
        return _receive(
            project_id=project_id, delivery_id=delivery_id, event=event, payload=payload, body_sha256=body_sha256
        )
    except IntegrityError:
        # Only if a copy of this delivery was inserted by a path that did not take the project lock; the row that
        # won decides, and this copy's run (if any) was rolled back with the transaction.
        project = Project.objects.filter(id=project_id).first()
        replay = _replay(project, delivery_id, body_sha256) if project is not None else None
        if replay is None:
            raise
        return replay


# --- Retention -----------------------------------------------------------------------------------------------


@transaction.atomic
def webhook_deliveries_purge(*, older_than_days: int) -> int:
    """Delete delivery records older than ``older_than_days`` days; returns how many went. Idempotent. Refuses to
    forget ids GitHub can still redeliver (``REDELIVERY_WINDOW_DAYS``)."""
    if older_than_days < REDELIVERY_WINDOW_DAYS:
        raise ValueError(f"older_than_days must be at least {REDELIVERY_WINDOW_DAYS} (GitHub's redelivery window)")
    cutoff = timezone.now() - timedelta(days=older_than_days)
    deleted, _ = WebhookDelivery.objects.filter(received_at__lt=cutoff).delete()
    return deleted
