"""Serializers for the audit trail API: a filter (query string) in, events out. They never write."""

from __future__ import annotations

import uuid
from typing import Any

from rest_framework import serializers

from runs.models import AuditEvent

ACTOR_KINDS = ["user", "api_key", "anonymous", "system"]


class AuditEventFilterSerializer(serializers.Serializer[Any]):
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
