"""Serializers for the runs and audit trail API: input and filters in, metadata out. They never write."""

from __future__ import annotations

import uuid
from typing import Any

from rest_framework import serializers

from cesaflow.lib.api import QuerySerializer, StrictInputSerializer
from runs.models import AuditEvent, Run, RunKind, RunStatus
from runs.services import MODEL_MAX_CHARS, OBJECTIVE_MAX_CHARS

ACTOR_KINDS = ["user", "api_key", "anonymous", "system"]


class AuditEventFilterSerializer(QuerySerializer):
    """Query-string filters. Times are ISO 8601 (``2025-01-31T12:00:00Z``; percent-encode a ``+`` offset)."""

    event = serializers.ChoiceField(choices=sorted(AuditEvent.EVENTS), required=False, help_text="An event name.")
    actor = serializers.CharField(
        max_length=254, required=False, help_text="A user or API key id, or part of the actor's label (e.g. email)."
    )
    since = serializers.DateTimeField(required=False, help_text="Events at or after this time.")
    until = serializers.DateTimeField(required=False, help_text="Events before this time.")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        since, until = attrs.get("since"), attrs.get("until")
        if since is not None and until is not None and since >= until:
            raise serializers.ValidationError({"until": ["Must be later than `since`."]})
        return attrs


class AuditActorSerializer(serializers.Serializer[AuditEvent]):
    """Who acted: a user, an org API key, an unauthenticated party (e.g. a failed login's email) or the system."""

    kind = serializers.ChoiceField(source="actor_kind", choices=ACTOR_KINDS, read_only=True)
    id = serializers.SerializerMethodField(help_text="The user's or API key's id; null when there is none.")
    # DRF's metaclass pops declared fields off the class, so this does not clash with Field.label at runtime.
    label = serializers.CharField(  # type: ignore[assignment]
        source="actor_label", read_only=True, help_text="Snapshot taken when it happened."
    )

    def get_id(self, event: AuditEvent) -> uuid.UUID | None:
        return event.actor_user_id or event.actor_api_key_id


class AuditTargetSerializer(serializers.Serializer[AuditEvent]):
    type = serializers.SerializerMethodField(help_text="What was acted on, e.g. `membership`, `apikey`.")
    id = serializers.SerializerMethodField()

    def get_type(self, event: AuditEvent) -> str | None:
        return event.target_type or None

    def get_id(self, event: AuditEvent) -> str | None:
        return event.target_id or None


class AuditEventSerializer(serializers.ModelSerializer[AuditEvent]):
    actor = AuditActorSerializer(source="*", read_only=True)
    target = AuditTargetSerializer(source="*", read_only=True)
    metadata = serializers.DictField(read_only=True)

    class Meta:
        model = AuditEvent
        fields = ["id", "event", "actor", "target", "ip", "user_agent", "metadata", "created_at"]
        read_only_fields = fields


# --- Runs -----------------------------------------------------------------------------------------------------


class RunCreateSerializer(StrictInputSerializer):
    """A chat or agent run: the objective goes to the model with the org's provider key. The key is resolved inside
    the caller's org: another org's key is "not found", like a missing one."""

    kind = serializers.ChoiceField(
        choices=[RunKind.CHAT, RunKind.AGENT],
        default=RunKind.CHAT,
        help_text="`chat`: one streamed answer. `agent`: the model writes and runs code in a sandboxed workspace, "
        "downloadable as a zip when the run ends (`GET /runs/{id}/workspace`).",
    )
    limits = serializers.DictField(
        required=False,
        help_text='Agent runs: budgets within the deployment\'s caps, e.g. `{"max_steps": 20, "max_tokens": '
        '200000, "wall_clock_s": 600, "command_timeout_s": 60}`.',
    )
    objective = serializers.CharField(max_length=OBJECTIVE_MAX_CHARS, help_text="What the model should do.")
    provider_key = serializers.UUIDField(
        required=False,
        help_text="The id of one of the organization's provider keys (optional with a `project` that has a "
        "default key).",
    )
    model = serializers.CharField(
        max_length=MODEL_MAX_CHARS,
        required=False,
        help_text="The provider's model id, e.g. `gpt-4o` (optional with a `project` that has a default model).",
    )
    project = serializers.UUIDField(
        required=False,
        help_text="Agent runs: work in this project's persistent workspace (one run at a time per project).",
    )
    watch = serializers.BooleanField(
        required=False,
        help_text="Default true for chat runs, false for agent runs: the run calls the provider only once a stream "
        "is attached "
        "(`GET /runs/{id}/events`, the run page, or `stream: true` here); nobody within the attach window "
        "(30 s by default) → cancelled `not_watched`, no tokens spent. `false`: start at once, unwatched.",
    )
    stream = serializers.BooleanField(
        default=False,
        help_text="Answer with the run's event stream (`text/event-stream`, as `GET /runs/{id}/events`) instead of "
        "JSON; the first event is the new run's `run.status`, carrying its id. Also chosen by "
        "`Accept: text/event-stream`.",
    )
    cancel_on_disconnect = serializers.BooleanField(
        default=False,
        help_text="With `stream`: cancel the run if this connection closes before the run ends (by default "
        "hanging up never stops a run).",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "project" in attrs and attrs.get("kind") != RunKind.AGENT:
            raise serializers.ValidationError({"project": ["Only agent runs work on a project."]})
        if "project" not in attrs:
            missing = {name: ["This field is required."] for name in ("provider_key", "model") if name not in attrs}
            if missing:
                raise serializers.ValidationError(missing)
        if attrs.get("cancel_on_disconnect") and not attrs.get("stream"):
            raise serializers.ValidationError(
                {"cancel_on_disconnect": ["Only with `stream: true` (there is no connection to watch otherwise)."]}
            )
        return attrs


class RunFilterSerializer(QuerySerializer):
    status = serializers.ChoiceField(choices=RunStatus.values, required=False, help_text="Only runs in this status.")
    kind = serializers.ChoiceField(choices=RunKind.values, required=False, help_text="Only runs of this kind.")
    created_by = serializers.UUIDField(required=False, help_text="Only runs started by this user or API key id.")


class RunCreatorSerializer(serializers.Serializer[Run]):
    kind = serializers.SerializerMethodField(help_text="`user`, `api_key`, or `unknown` (deleted since).")
    id = serializers.SerializerMethodField(help_text="The user's or API key's id; null when it is gone.")
    # DRF's metaclass pops declared fields off the class, so this does not clash with Field.label at runtime.
    label = serializers.CharField(  # type: ignore[assignment]
        source="created_by_label", read_only=True, help_text="Snapshot taken when the run was created."
    )

    def get_kind(self, run: Run) -> str:
        if run.created_by_api_key_id:
            return "api_key"
        return "user" if run.created_by_user_id else "unknown"

    def get_id(self, run: Run) -> uuid.UUID | None:
        return run.created_by_user_id or run.created_by_api_key_id


class RunSerializer(serializers.ModelSerializer[Run]):
    """A run's metadata. There is no field for the answer: it is streamed (``/runs/{id}/events``), never stored."""

    provider_key = serializers.UUIDField(source="provider_key_id", read_only=True, allow_null=True)
    created_by = RunCreatorSerializer(source="*", read_only=True)
    total_tokens = serializers.IntegerField(read_only=True)
    cancel_requested = serializers.SerializerMethodField(help_text="A cancel was asked for and is being carried out.")
    waiting_for_watcher = serializers.BooleanField(
        read_only=True, help_text="Queued until a stream is attached (`GET /runs/{id}/events` or the run page)."
    )
    limits = serializers.DictField(read_only=True, help_text="Agent runs: the budgets this run had.")

    class Meta:
        model = Run
        fields = [
            "id",
            "kind",
            "status",
            "objective",
            "provider",
            "provider_key",
            "model",
            "error_kind",
            "error_message",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
            "input_tokens",
            "output_tokens",
            "total_tokens",
            "usage_complete",
            "cancel_requested",
            "watch",
            "waiting_for_watcher",
            "limits",
            "sandbox_mode",
            "workspace_state",
            "workspace_expires_at",
            "workspace_deleted_at",
        ]
        read_only_fields = fields

    def get_cancel_requested(self, run: Run) -> bool:
        return run.cancel_requested_at is not None and not run.is_terminal
