"""REST API v1 for the usage ledger: ``GET /api/v1/usage`` (token totals grouped by provider, model, member or day).

Read-only; the ledger is written by ``runs.services.run_finish``. Same periods and limits as the Usage page.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from cesaflow.lib.api import QuerySerializer, error_responses
from orgs.api.base import OrgAPIView
from orgs.permissions import USAGE_READ
from runs.selectors import tokens_used_this_month
from runs.usage import GROUP_BYS, MAX_PERIOD_DAYS, PeriodError, UsageRow, usage_by, usage_period, usage_totals


class UsageQuerySerializer(QuerySerializer):
    """Query string. Dates are whole UTC days (``YYYY-MM-DD``); ``until`` is inclusive."""

    since = serializers.DateField(
        required=False, help_text="First day (UTC). Default: the first of `until`'s month, or of this month."
    )
    until = serializers.DateField(required=False, help_text="Last day (UTC), included. Default: today.")
    group_by = serializers.ChoiceField(
        choices=list(GROUP_BYS), required=False, default="day", help_text="How to group the totals."
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        try:
            attrs["period"] = usage_period(attrs.get("since"), attrs.get("until"))
        except PeriodError as exc:
            raise serializers.ValidationError({exc.field: [exc.message]}) from None
        return attrs


class UsageTotalsSerializer(serializers.Serializer[UsageRow]):
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    calls = serializers.IntegerField(help_text="Provider calls (usage-ledger entries).")


class UsageGroupSerializer(UsageTotalsSerializer):
    key = serializers.CharField(
        help_text="The provider (`openai`…), the model, the member (email, or the API key's label) or the day "
        "(`YYYY-MM-DD`)."
    )
    # Only with group_by=member (required=False: absent from the other groupings' rows, and so in the schema).
    user_id = serializers.UUIDField(
        allow_null=True, required=False, help_text="group_by=member: the user, if it was one."
    )
    api_key_id = serializers.UUIDField(
        allow_null=True, required=False, help_text="group_by=member: the org API key, if it was one."
    )

    def to_representation(self, instance: UsageRow) -> dict[str, Any]:
        data = super().to_representation(instance)
        if self.context.get("group_by") != "member":
            # Only members have ids; other groupings keep the row small.
            data.pop("user_id", None)
            data.pop("api_key_id", None)
        return data


class UsageResponseSerializer(serializers.Serializer[Any]):
    """The response's shape, for the schema (the view assembles the body from the serializers above)."""

    since = serializers.DateField()
    until = serializers.DateField()
    group_by = serializers.ChoiceField(choices=list(GROUP_BYS))
    results = UsageGroupSerializer(many=True, help_text="Busiest first; days in calendar order, only days with usage.")
    totals = UsageTotalsSerializer()
    monthly_token_cap = serializers.IntegerField(allow_null=True, help_text="Null when there is no cap.")
    tokens_used_this_month = serializers.IntegerField(help_text="What counts against the cap (UTC month).")


class UsageView(OrgAPIView):
    capabilities = {"GET": USAGE_READ}

    @extend_schema(
        operation_id="usage_retrieve",
        summary="Token usage of the organization, grouped",
        description=f"Totals from the usage ledger for a period of at most {MAX_PERIOD_DAYS} days "
        "(default: this month so far).",
        parameters=[UsageQuerySerializer],
        responses={200: UsageResponseSerializer, **error_responses(400, 401, 403, 404)},
    )
    def get(self, request: Request) -> Response:
        query = UsageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        period = query.validated_data["period"]
        group_by = query.validated_data["group_by"]
        rows = usage_by(org=self.org, period=period, group_by=group_by)
        body = {
            "since": period.since.isoformat(),
            "until": period.until.isoformat(),
            "group_by": group_by,
            "results": [UsageGroupSerializer(row, context={"group_by": group_by}).data for row in rows],
            "totals": UsageTotalsSerializer(usage_totals(rows)).data,
            "monthly_token_cap": self.org.monthly_token_cap,
            "tokens_used_this_month": tokens_used_this_month(org=self.org),
        }
        return Response(body)
