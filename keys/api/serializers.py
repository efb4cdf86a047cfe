"""Provider-key API shapes: input and output are separate, and the secret only ever goes in.

Serializers validate shape only; ``keys.services`` seals, stores and audits.
"""

from __future__ import annotations

from rest_framework import serializers

from keys.models import KeyStatus, Provider, ProviderKey
from keys.services import LABEL_MAX_LENGTH, SECRET_MAX_LENGTH


class ProviderKeyCreateSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """``POST /api/v1/provider-keys``. Unknown fields (``org``, ``status``, ``last_four``...) are ignored."""

    provider = serializers.ChoiceField(choices=Provider.choices)
    # The stubs type Serializer.label (a Field attribute) as text; here it is our "label" field, as DRF allows.
    label = serializers.CharField(max_length=LABEL_MAX_LENGTH)  # type: ignore[assignment]
    # write_only: this serializer's .data never contains it; errors about it never quote it.
    secret = serializers.CharField(
        write_only=True, max_length=SECRET_MAX_LENGTH, style={"input_type": "password"}, trim_whitespace=True
    )
    base_url = serializers.CharField(max_length=500, required=False, allow_blank=True, allow_null=True, default="")


class ProviderKeySerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    """What the API says about a key: metadata and the last four characters, never the secret."""

    created_by = serializers.CharField(source="created_by_label", read_only=True)
    provider = serializers.ChoiceField(choices=Provider.choices, read_only=True)
    status = serializers.ChoiceField(choices=KeyStatus.choices, read_only=True)

    class Meta:
        model = ProviderKey
        fields = [
            "id",
            "provider",
            "label",
            "base_url",
            "last_four",
            "status",
            "created_by",
            "created_at",
            "last_used_at",
            "last_checked_at",
            "revoked_at",
        ]
        read_only_fields = fields
