"""Input and output serializers for the orgs API. They shape data only: services do the writes and the audit."""

from __future__ import annotations

from django.utils import timezone
from rest_framework import serializers

from cesaflow.lib.api import QuerySerializer, StrictInputSerializer
from orgs.models import ApiKey, Membership, Organization, Role, User
from orgs.permissions import ALL_CAPABILITIES

# --- Output -----------------------------------------------------------------------------------------


class OrganizationSerializer(serializers.ModelSerializer[Organization]):
    class Meta:
        model = Organization
        fields = ["id", "slug", "name", "created_at"]
        read_only_fields = fields


class MemberSerializer(serializers.ModelSerializer[Membership]):
    user_id = serializers.UUIDField(read_only=True)
    email = serializers.EmailField(source="user.email", read_only=True)
    name = serializers.CharField(source="user.name", read_only=True)
    role = serializers.ChoiceField(choices=Role.choices, read_only=True)
    joined_at = serializers.DateTimeField(source="created_at", read_only=True)

    class Meta:
        model = Membership
        fields = ["id", "user_id", "email", "name", "role", "joined_at"]
        read_only_fields = fields


class UserRefSerializer(serializers.ModelSerializer[User]):
    class Meta:
        model = User
        fields = ["id", "email", "name"]
        read_only_fields = fields


class ApiKeySerializer(serializers.ModelSerializer[ApiKey]):
    """An org API key as anyone may see it again: never the secret, only its public prefix and last four."""

    masked = serializers.CharField(read_only=True, help_text="Recognizable form: prefix and last four characters.")
    scopes = serializers.ListField(child=serializers.CharField(), read_only=True)
    created_by = UserRefSerializer(read_only=True, allow_null=True, help_text="Null when made by a command.")
    is_active = serializers.SerializerMethodField(help_text="Neither revoked nor expired.")
    scopes_clipped_at = serializers.DateTimeField(
        read_only=True,
        allow_null=True,
        help_text="When the key lost scopes because its creator's role changed; null if it never did.",
    )
    clipped_scopes = serializers.ListField(
        child=serializers.CharField(), read_only=True, help_text="The scopes it lost that way."
    )

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "name",
            "prefix",
            "masked",
            "scopes",
            "created_by",
            "created_at",
            "expires_at",
            "last_used_at",
            "revoked_at",
            "is_active",
            "scopes_clipped_at",
            "clipped_scopes",
        ]
        read_only_fields = fields

    def get_is_active(self, api_key: ApiKey) -> bool:
        return api_key.is_active(timezone.now())


class ApiKeyCreatedSerializer(ApiKeySerializer):
    """The response to creating a key: the only time the secret ``key`` is ever returned."""

    key = serializers.SerializerMethodField(help_text="The secret. Shown once: store it now.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]
        read_only_fields = fields

    def get_key(self, api_key: ApiKey) -> str:
        return str(self.context["secret"])


# --- Input ------------------------------------------------------------------------------------------


class OrganizationUpdateSerializer(StrictInputSerializer):
    name = serializers.CharField(max_length=100, required=False)


class MemberUpdateSerializer(StrictInputSerializer):
    role = serializers.ChoiceField(choices=Role.choices)


class MemberRemoveQuerySerializer(QuerySerializer):
    """Query string of ``DELETE /members/{id}``."""

    revoke_api_keys = serializers.BooleanField(
        default=True,
        help_text="Also revoke the active org API keys the member created (`true` or `false`). Default: true.",
    )


class ApiKeyCreateSerializer(StrictInputSerializer):
    name = serializers.CharField(max_length=100)
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=sorted(ALL_CAPABILITIES)),
        required=False,
        allow_empty=False,
        max_length=len(ALL_CAPABILITIES),
        help_text="A subset of your own capabilities. Default: the Developer set.",
    )
    expires_at = serializers.DateTimeField(required=False, allow_null=True, help_text="ISO 8601; omit for no expiry.")

    def validate_scopes(self, value: list[str]) -> list[str]:
        return sorted(set(value))
