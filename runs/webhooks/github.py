"""What a verified GitHub delivery asks CesaFlow to do: pure functions over the parsed payload, no I/O.

Only three shapes are acted on (docs.github.com "Webhook events and payloads"): ``ping``; ``issues`` with action
``labeled`` and the project's label; ``issue_comment`` with action ``created`` whose body starts with
``/cesaflow `` written by an owner, member or collaborator of the repository. Everything else is ignored, with a
reason short enough to be recorded on the delivery and shown to whoever looks at it on GitHub.

Payloads come from GitHub but are treated as untrusted data all the same: every field is read defensively (wrong
type → as if absent) and only metadata leaves this module, except the objective of a run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

COMMAND_PREFIX: Final = "/cesaflow "
# GitHub's author_association values that mean "has a say in this repository" (the others: CONTRIBUTOR,
# FIRST_TIME_CONTRIBUTOR, FIRST_TIMER, MANNEQUIN, NONE). A comment is public; its author's association is not
# something they choose, GitHub computes it.
TRUSTED_ASSOCIATIONS: Final = frozenset({"OWNER", "MEMBER", "COLLABORATOR"})
# Delivery metadata columns (WebhookDelivery.event / .action) hold at most 50 characters.
FIELD_MAX_CHARS: Final = 50

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Intent:
    """The decision for one delivery: answer a ping, start a run with ``objective``, or ignore it (``reason``)."""

    kind: Literal["pong", "run", "ignored"]
    objective: str = ""
    reason: str = ""

    def __repr__(self) -> str:
        # The objective is a customer's issue text: keep it out of reprs (tracebacks, debug logs).
        return f"Intent(kind={self.kind!r}, reason={self.reason!r})"


def _field(payload: Mapping[str, Any], *path: str) -> Any:
    value: Any = payload
    for name in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(name)
    return value


def _text(payload: Mapping[str, Any], *path: str) -> str:
    value = _field(payload, *path)
    return value if isinstance(value, str) else ""


def clean_metadata(value: str) -> str:
    """An event or action name fit for a metadata column: no control characters, at most 50 characters."""
    return _CONTROL.sub("", value)[:FIELD_MAX_CHARS]


def delivery_action(payload: Mapping[str, Any]) -> str:
    """The payload's ``action`` (``labeled``, ``created``…), or "" for events without one (``ping``, ``push``)."""
    return clean_metadata(_text(payload, "action"))


def repository_full_name(payload: Mapping[str, Any]) -> str:
    """``repository.full_name`` ("owner/name"), or "" when the delivery names no repository."""
    return _text(payload, "repository", "full_name")


def _objective(text: str) -> str:
    # PostgreSQL text cannot hold NUL; a JSON string can ("\u0000"). Drop it rather than fail the insert.
    return text.replace("\x00", "").strip()


def interpret(
    *,
    event: str,
    payload: Mapping[str, Any],
    repository: str,
    label: str,
    not_before: datetime | None = None,
) -> Intent:
    """Decide what to do with a verified delivery of ``event`` for a project connected to ``repository`` whose runs
    start with ``label``. The repository must match (case-insensitive, as GitHub's names are) before anything else.

    ``not_before``: an issue labelled, or a comment written, before this time is not acted on. GitHub signs no
    timestamp, and delivery ids are forgotten after their retention: a signed body captured from a repository's
    delivery log could otherwise be replayed under a new id once its id is purged."""
    full_name = repository_full_name(payload)
    if not full_name:
        return Intent("ignored", reason="The delivery names no repository.")
    if full_name.casefold() != repository.casefold():
        return Intent("ignored", reason="The delivery is for another repository than the connected one.")
    action = delivery_action(payload)
    if event == "ping":
        return Intent("pong")
    if event == "issues" and action == "labeled":
        if _older_than(payload, not_before, "issue", "updated_at"):
            return Intent("ignored", reason=TOO_OLD)
        return _issue_labeled(payload, label)
    if event == "issue_comment" and action == "created":
        if _older_than(payload, not_before, "comment", "created_at"):
            return Intent("ignored", reason=TOO_OLD)
        return _comment_created(payload)
    shown = f"{clean_metadata(event)}/{action}" if action else clean_metadata(event)
    return Intent("ignored", reason=f"{shown} deliveries do not start runs.")


TOO_OLD: Final = "The issue or comment is older than the replay window; it does not start a run."


def _older_than(payload: Mapping[str, Any], not_before: datetime | None, *path: str) -> bool:
    """True when the payload's timestamp at ``path`` is before ``not_before``. A missing or unreadable timestamp is
    not old (the body is signed: only a holder of the secret could have left it out)."""
    if not_before is None:
        return False
    text = _text(payload, *path)
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp < not_before


def _issue_labeled(payload: Mapping[str, Any], label: str) -> Intent:
    added = _text(payload, "label", "name")
    # GitHub label names are unique per repository regardless of case, so "CesaFlow" is the same label.
    if not added or not label or added.casefold() != label.casefold():
        return Intent("ignored", reason=f"Only the label '{label}' starts a run.")
    title = _text(payload, "issue", "title")
    body = _text(payload, "issue", "body")  # null when the issue has no description
    objective = _objective(f"{title}\n\n{body}" if body else title)
    if not objective:
        return Intent("ignored", reason="The issue has no title or body to work on.")
    return Intent("run", objective=objective)


def _comment_created(payload: Mapping[str, Any]) -> Intent:
    body = _text(payload, "comment", "body")
    if not body.startswith(COMMAND_PREFIX):
        return Intent("ignored", reason=f"Only comments starting with '{COMMAND_PREFIX.strip()} ' start a run.")
    association = _text(payload, "comment", "author_association")
    if association not in TRUSTED_ASSOCIATIONS:
        shown = clean_metadata(association) or "unknown"
        return Intent(
            "ignored",
            reason=f"Only owners, members and collaborators can start runs (author association: {shown}).",
        )
    objective = _objective(body[len(COMMAND_PREFIX) :])
    if not objective:
        return Intent("ignored", reason=f"Say what to do after '{COMMAND_PREFIX.strip()}'.")
    return Intent("run", objective=objective)
