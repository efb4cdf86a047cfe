"""``POST /hooks/github/<project uuid>/``: GitHub deliveries that start agent runs on a project.

A plain async Django view, not DRF: no authentication classes, no session, no CSRF (GitHub cannot send a token);
the HMAC signature of the raw body is the only credential. The checks run cheapest and least revealing first:

1. method (405), content type (415), size (413) — before the body is read or parsed;
2. the signature, against the project's current and previous secret: an unknown project, a project that is not
   connected, and a missing, malformed or wrong signature all get the *same* 401, so the endpoint is no oracle
   for which project ids exist; nothing is recorded but a counter and a rate-limited audit event;
3. only then JSON (400), the delivery id (400), the replay guard (200 duplicate / 409), the repository, the event.

GitHub waits 10 seconds at most: the view only writes two rows and answers 202; the run executes in the background
(the executor picks it up once the transaction commits). Bodies and headers are never logged nor stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from typing import Any, Final

from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_not_required
from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.debug import sensitive_variables

from cesaflow.lib.api import error_body
from cesaflow.lib.body_limit import too_large_message
from keys.crypto import Secret
from runs.models import Project
from runs.projects.selectors import unscoped_project_for_webhook
from runs.webhooks.secrets import signature_matches, signature_well_formed
from runs.webhooks.services import (
    DeliveryOutcome,
    project_webhook_secrets,
    webhook_delivery_receive,
    webhook_max_body_bytes,
    webhook_signature_failed,
)

logger = logging.getLogger(__name__)

# GitHub's delivery ids are GUIDs; the column holds 100 characters. Anything else is not a GitHub delivery.
_DELIVERY_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,100}")
_EVENT_RE: Final = re.compile(r"[a-z_]{1,50}")
_UNVERIFIED: Final = "The delivery's signature could not be verified."
# The HTTP status of each outcome of a verified delivery (GitHub shows it in the hook's "Recent Deliveries").
_STATUS: Final = {"pong": 200, "duplicate": 200, "conflict": 409, "run_started": 202, "ignored": 202}
# Computed for deliveries to an unknown or unconnected project, so they cost about what a wrong signature costs.
_DECOY: Final = Secret("decoy-secret-never-matches-anything")


def _json(body: dict[str, Any], status: int, **headers: str) -> JsonResponse:
    response = JsonResponse(body, status=status)
    response.headers["Cache-Control"] = "no-store"
    for name, value in headers.items():
        response.headers[name] = value
    return response


def _error(status: int, code: str, message: str) -> JsonResponse:
    return _json(error_body(code, message), status)


def _unauthorized() -> JsonResponse:
    # One body for every failure before the signature is verified: no oracle for project ids or secrets.
    return _error(401, "unauthenticated", _UNVERIFIED)


def _declared_length(request: HttpRequest) -> int | None:
    """The Content-Length the client declared; None when absent (chunked) or not a number."""
    raw = request.META.get("CONTENT_LENGTH") or ""
    return int(raw) if raw.isdigit() else None


def _outcome_response(outcome: DeliveryOutcome) -> JsonResponse:
    if outcome.status == "conflict":
        return _error(409, "conflict", outcome.reason)
    body: dict[str, Any] = {"status": outcome.status}
    if outcome.reason:
        body["reason"] = outcome.reason
    if outcome.run_id is not None:
        body["run_id"] = str(outcome.run_id)
    return _json(body, _STATUS[outcome.status])


def _load(project_id: uuid.UUID) -> tuple[Project | None, list[Secret]]:
    project = unscoped_project_for_webhook(project_id=project_id)
    return project, (project_webhook_secrets(project=project) if project is not None else [])


@sensitive_variables("candidates", "body")
def _signature_failure(project: Project | None, candidates: list[Secret], header: str, body: bytes) -> str | None:
    """Why the delivery is refused (a kind for the counter and the log), or None when its signature verifies."""
    if project is None or not candidates:
        signature_matches(candidates=[_DECOY], body=body, header=header)  # the same work as a real check
        if project is None:
            return "unknown_project"
        # Connected but no secret opens: project_webhook_secrets has logged it for the operators.
        return "secret_unavailable" if project.github_connected else "not_connected"
    if not header:
        return "missing"
    if not signature_well_formed(header):
        return "malformed"
    if not signature_matches(candidates=candidates, body=body, header=header):
        return "mismatch"
    return None


@csrf_exempt
@login_not_required
@sensitive_variables("body", "payload", "candidates")
async def github_webhook(request: HttpRequest, project_id: uuid.UUID) -> JsonResponse:
    """Receive one GitHub delivery for the project ``project_id`` (see the module docstring for the rules)."""
    if request.method != "POST":
        return _json(error_body("method_not_allowed", "Only POST is accepted."), 405, Allow="POST")
    if request.content_type != "application/json":
        return _error(415, "unsupported_media_type", "Send the delivery as application/json.")
    # The server refuses an oversized delivery before reading its body (the request-body limit table's /hooks/github/
    # entry is this same setting, answered with the same message); this check covers any other way in.
    cap = webhook_max_body_bytes()
    declared = _declared_length(request)
    if declared is not None and declared > cap:
        return _error(413, "request_too_large", too_large_message(cap))
    # Never read more than declared (what is verified is what was declared), nor one byte past the cap when nothing
    # was declared (chunked): an oversized body is refused without being held in memory. Not request.body: it
    # would read up to DATA_UPLOAD_MAX_MEMORY_SIZE instead of this cap.
    body = request.read(cap + 1 if declared is None else declared)
    if len(body) > cap:
        return _error(413, "request_too_large", too_large_message(cap))

    try:
        project, candidates = await sync_to_async(_load)(project_id)
        header = request.headers.get("X-Hub-Signature-256", "")
        kind = _signature_failure(project, candidates, header, body)
        if kind is not None or project is None:
            await sync_to_async(webhook_signature_failed)(project=project, kind=kind or "unknown_project")
            return _unauthorized()

        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: absurd nesting
            return _error(400, "invalid_json", "The delivery body is not valid JSON.")
        if not isinstance(payload, dict):
            return _error(400, "invalid_json", "The delivery body must be a JSON object.")
        delivery_id = request.headers.get("X-GitHub-Delivery", "")
        if not _DELIVERY_ID_RE.fullmatch(delivery_id):
            return _error(400, "invalid_delivery_id", "X-GitHub-Delivery is missing or malformed.")
        event = request.headers.get("X-GitHub-Event", "")
        if not _EVENT_RE.fullmatch(event):
            return _error(400, "invalid_event", "X-GitHub-Event is missing or malformed.")

        outcome = await sync_to_async(webhook_delivery_receive)(
            project_id=project.id,
            delivery_id=delivery_id,
            event=event,
            payload=payload,
            body_sha256=hashlib.sha256(body).hexdigest(),
        )
    except DatabaseError as exc:
        # Not a 2XX: GitHub marks the delivery failed and it can be redelivered once the database is back.
        logger.error("webhook delivery not processed: database unavailable (%s)", type(exc).__name__)
        return _error(503, "unavailable", "The delivery could not be processed; redeliver it later.")
    return _outcome_response(outcome)
