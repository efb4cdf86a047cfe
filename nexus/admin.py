"""What operators see in Nexus, and the actions admin operators may take.

Every page is read-only (no add, change or delete anywhere); the only writes are the registered operator actions
(``nexus.actions.ACTIONS``), offered to ``admin`` operators only, each behind a confirmation page that requires a
reason. Fields are allowlisted per model: nothing sealed (provider-key ciphertext, webhook secrets, TOTP secrets),
no digest, and no user content (a run's objective) is ever shown or exported.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, F, Model, OuterRef, Q, QuerySet, Subquery, Sum
from django.db.models.constants import LOOKUP_SEP
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone

from keys.models import ProviderKey
from nexus.actions import ACTIONS, ActionSpec
from nexus.models import InstallationEvent, Operator
from orgs import login_guard
from orgs.models import ApiKey, Organization, User
from runs.models import AuditEvent, Run, UsageRecord

REASON_MAX_CHARS = 2000
if TYPE_CHECKING:
    from collections.abc import Callable

    ActionFunc = Callable[[admin.ModelAdmin[Any], HttpRequest, QuerySet[Any]], HttpResponse | None]


def operator_of(request: HttpRequest) -> Operator | None:
    operator = getattr(request, "nexus_operator", None)
    return operator if isinstance(operator, Operator) else None


class _Echo:
    """A file-like object whose write returns the line, for streaming CSV."""

    def write(self, value: str) -> str:
        return value


def _csv_cell(value: Any) -> str:
    text = "" if value is None else str(value)
    # Spreadsheet formula injection: a cell starting with one of these is read as a formula.
    return f"'{text}" if text[:1] in {"=", "+", "-", "@", "\t", "\r"} else text


class NexusModelAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Read-only for everyone; CSV export of the selected rows; the model's operator actions for admins."""

    list_per_page = 50
    show_full_result_count = False
    #: Columns of the CSV export (defaults to ``list_display``'s plain field names).
    export_fields: tuple[str, ...] = ()

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return operator_of(request) is not None

    def has_module_permission(self, request: HttpRequest) -> bool:
        return operator_of(request) is not None

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        """Only the filters this page offers. Django would otherwise accept any lookup on the model's own fields
        (``?password__regex=…``, ``?sealed_secret__startswith=…``), and the row count would answer yes or no."""
        first = lookup.split(LOOKUP_SEP)[0]
        offered: set[str] = set()
        for entry in self.list_filter:
            name = entry if isinstance(entry, str) else entry[0] if isinstance(entry, tuple) else None
            if isinstance(name, str):
                offered.add(name.split(LOOKUP_SEP)[0])
        if self.date_hierarchy:
            offered.add(self.date_hierarchy.split(LOOKUP_SEP)[0])
        if first not in offered:
            return False
        return bool(super().lookup_allowed(lookup, value, request))

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions: dict[str, Any] = {}
        operator = operator_of(request)
        if operator is None:
            return actions
        actions["export_csv"] = (NexusModelAdmin.export_csv, "export_csv", "Export the selected rows as CSV")
        if operator.may_act:
            for spec in ACTIONS.values():
                if spec.model is self.model:
                    actions[spec.name] = (_operator_action(spec), spec.name, spec.label)
        return actions

    def export_csv(self, request: HttpRequest, queryset: QuerySet[Any]) -> StreamingHttpResponse:
        fields = self.export_fields or tuple(name for name in self.list_display if isinstance(name, str))
        writer = csv.writer(_Echo())

        def rows() -> Iterable[str]:
            yield writer.writerow(fields)
            for obj in queryset.iterator(chunk_size=500):
                yield writer.writerow([_csv_cell(_value(self, obj, name)) for name in fields])

        response = StreamingHttpResponse(rows(), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{self.model._meta.model_name}.csv"'
        return response


def _value(model_admin: admin.ModelAdmin[Any], obj: Model, name: str) -> Any:
    attribute = getattr(model_admin, name, None)
    if callable(attribute):
        return attribute(obj)
    return getattr(obj, name)


def _operator_action(spec: ActionSpec) -> ActionFunc:
    """An admin action around one registered operator action: a confirmation page asking for the reason (and the
    action's parameters), then the action for each selected object. The action itself refuses support operators."""

    def action(
        model_admin: admin.ModelAdmin[Any], request: HttpRequest, queryset: QuerySet[Any]
    ) -> HttpResponse | None:
        operator = operator_of(request)
        if operator is None or not operator.may_act:
            raise PermissionDenied
        reason = request.POST.get("reason", "").strip()
        params, errors = _params(spec, request)
        if request.POST.get("confirm") == "yes" and reason and len(reason) <= REASON_MAX_CHARS and not errors:
            done = failed = 0
            for obj in queryset:
                try:
                    spec.perform(operator=operator, obj=obj, reason=reason, **params)
                    done += 1
                except (ValidationError, PermissionDenied) as exc:
                    failed += 1
                    model_admin.message_user(request, f"{obj}: {_message(exc)}", messages.ERROR)
            if done:
                model_admin.message_user(
                    request, f"{spec.label}: done for {done} of {done + failed}.", messages.SUCCESS
                )
            return None
        if request.POST.get("confirm") == "yes" and not reason:
            errors.append("A reason is required: it is recorded in both audit trails.")
        context = {
            **model_admin.admin_site.each_context(request),
            "title": spec.label,
            "spec": spec,
            "objects": list(queryset[:100]),
            "count": queryset.count(),
            "selected": request.POST.getlist(ACTION_CHECKBOX_NAME),
            "select_across": "1" if request.POST.get("select_across") == "1" else "0",
            "reason": reason,
            "errors": errors,
            "opts": model_admin.model._meta,
            "params": {name: request.POST.get(name, "") for name in spec.params},
        }
        return TemplateResponse(request, "nexus/action_confirm.html", context)

    action.__name__ = spec.name
    return action


def _params(spec: ActionSpec, request: HttpRequest) -> tuple[dict[str, Any], list[str]]:
    params: dict[str, Any] = {}
    errors: list[str] = []
    for name in spec.params:
        raw = request.POST.get(name, "").strip()
        if name == "cap":
            if raw == "":
                params[name] = None  # no cap
            elif raw.isdigit() and len(raw) <= 15:
                params[name] = int(raw)
            else:
                errors.append("The cap is a whole number of tokens, or empty for no cap.")
    return params, errors


def _message(exc: ValidationError | PermissionDenied) -> str:
    if isinstance(exc, ValidationError):
        return " ".join(exc.messages)
    return "Not allowed."


# --- Registrations ---------------------------------------------------------------------------------------------------


class OrganizationAdmin(NexusModelAdmin):
    list_display = (
        "name",
        "slug",
        "status",
        "member_count",
        "monthly_token_cap",
        "runs_this_month",
        "tokens_this_month",
        "created_at",
    )
    search_fields = ("name", "slug")
    list_filter = (("suspended_at", admin.EmptyFieldListFilter),)
    date_hierarchy = "created_at"
    fields = (
        "id",
        "name",
        "slug",
        "status",
        "suspended_reason",
        "monthly_token_cap",
        "member_count",
        "runs_this_month",
        "tokens_this_month",
        "created_at",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Organization]:
        month = timezone.now().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        queryset: QuerySet[Organization] = (
            super()
            .get_queryset(request)
            .annotate(
                _members=Count("memberships", distinct=True),
                _runs=Count("runs", filter=Q(runs__created_at__gte=month), distinct=True),
                # A subquery, not a join: summed over the joins above, tokens would be counted once per member.
                _tokens=Coalesce(
                    Subquery(
                        UsageRecord.objects.filter(org=OuterRef("pk"), created_at__gte=month)
                        .values("org")
                        .annotate(total=Sum(F("input_tokens") + F("output_tokens")))
                        .values("total")[:1]
                    ),
                    0,
                ),
            )
        )
        return queryset

    @admin.display(description="Status")
    def status(self, obj: Organization) -> str:
        return "suspended" if obj.suspended_at else "active"

    @admin.display(description="Members", ordering="_members")
    def member_count(self, obj: Organization) -> int:
        return int(getattr(obj, "_members", obj.memberships.count()))

    @admin.display(description="Runs this month", ordering="_runs")
    def runs_this_month(self, obj: Organization) -> int:
        return int(getattr(obj, "_runs", 0))

    @admin.display(description="Tokens this month", ordering="_tokens")
    def tokens_this_month(self, obj: Organization) -> int:
        return int(getattr(obj, "_tokens", 0))


class UserAdmin(NexusModelAdmin):
    list_display = ("email", "name", "is_active", "last_login", "organizations", "locked")
    search_fields = ("email", "name")
    list_filter = ("is_active",)
    fields = ("id", "email", "name", "is_active", "last_login", "date_joined", "organizations", "locked")
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[User]:
        return super().get_queryset(request).prefetch_related("memberships__org")

    @admin.display(description="Organizations")
    def organizations(self, obj: User) -> str:
        return ", ".join(f"{m.org.name} ({m.role})" for m in obj.memberships.all())

    @admin.display(description="Sign-in locked", boolean=True)
    def locked(self, obj: User) -> bool:
        return login_guard.login_lockout(email=obj.email, ip=None) is not None


class RunAdmin(NexusModelAdmin):
    """Metadata only: never the objective (what the run was asked) nor anything it produced."""

    list_display = ("id", "org", "kind", "status", "provider", "model", "input_tokens", "output_tokens", "created_at")
    list_filter = ("status", "kind", "provider", "org")
    search_fields = ("=id", "org__slug", "model")
    date_hierarchy = "created_at"
    list_select_related = ("org",)
    fields = (
        "id",
        "org",
        "kind",
        "status",
        "provider",
        "model",
        "error_kind",
        "created_by_label",
        "created_at",
        "started_at",
        "finished_at",
        "input_tokens",
        "output_tokens",
        "usage_complete",
        "sandbox_mode",
        "workspace_state",
    )
    readonly_fields = fields


class UsageRecordAdmin(NexusModelAdmin):
    list_display = ("created_at", "org", "run_id", "provider", "model", "input_tokens", "output_tokens", "complete")
    list_filter = ("provider", "org")
    date_hierarchy = "created_at"
    list_select_related = ("org",)
    fields = ("id", "org", "run", "provider", "model", "input_tokens", "output_tokens", "complete", "created_at")
    readonly_fields = fields

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        since = timezone.now() - timedelta(days=30)
        totals = UsageRecord.objects.filter(created_at__gte=since).aggregate(
            input=Sum("input_tokens"), output=Sum("output_tokens")
        )
        extra = {
            **(extra_context or {}),
            "subtitle": f"Last 30 days: {totals['input'] or 0:,} in, {totals['output'] or 0:,} out",
        }
        return super().changelist_view(request, extra)


class AuditEventAdmin(NexusModelAdmin):
    list_display = ("created_at", "org", "event", "actor_label", "target_type", "target_id", "ip")
    list_filter = ("event", "org")
    search_fields = ("actor_label", "target_id", "event")
    date_hierarchy = "created_at"
    list_select_related = ("org",)
    fields = (
        "id",
        "created_at",
        "org",
        "event",
        "actor_label",
        "target_type",
        "target_id",
        "ip",
        "user_agent",
        "metadata",
    )
    readonly_fields = fields


class ProviderKeyAdmin(NexusModelAdmin):
    """Metadata only: never the sealed value, and there is no decrypt action."""

    list_display = ("label", "org", "provider", "masked", "status", "kid", "created_at", "last_used_at")
    list_filter = ("provider", "status", "kid")
    search_fields = ("label", "org__slug")
    list_select_related = ("org",)
    fields = (
        "id",
        "org",
        "provider",
        "label",
        "base_url",
        "masked",
        "status",
        "kid",
        "created_by_label",
        "created_at",
        "last_used_at",
        "last_checked_at",
        "revoked_at",
    )
    readonly_fields = fields

    @admin.display(description="Key")
    def masked(self, obj: ProviderKey) -> str:
        return f"…{obj.last_four}" if obj.last_four else "-"


class ApiKeyAdmin(NexusModelAdmin):
    """Org API keys: metadata only (the digest never leaves the database)."""

    list_display = ("name", "org", "masked", "created_by", "created_at", "last_used_at", "expires_at", "revoked_at")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter), "org")
    search_fields = ("name", "prefix", "org__slug")
    list_select_related = ("org", "created_by")
    fields = (
        "id",
        "org",
        "name",
        "masked",
        "scopes",
        "scopes_clipped_at",
        "created_by",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
    )
    readonly_fields = fields


class InstallationEventAdmin(NexusModelAdmin):
    list_display = ("at", "event", "operator_label", "org", "target_type", "target_id", "ip")
    list_filter = ("event",)
    search_fields = ("operator_label", "target_id", "reason")
    date_hierarchy = "at"
    fields = (
        "id",
        "at",
        "event",
        "operator_label",
        "org",
        "target_type",
        "target_id",
        "reason",
        "ip",
        "user_agent",
        "metadata",
    )
    readonly_fields = fields


class OperatorAdmin(NexusModelAdmin):
    """Operators are managed with ``manage.py create_operator``; here they are only listed."""

    list_display = ("email", "name", "role", "is_active", "enrolled", "last_login")
    list_filter = ("role", "is_active")
    fields = ("id", "email", "name", "role", "is_active", "enrolled", "created_at", "last_login")
    readonly_fields = fields

    @admin.display(description="TOTP enrolled", boolean=True)
    def enrolled(self, obj: Operator) -> bool:
        return obj.totp_enrolled_at is not None


REGISTRY: tuple[tuple[type[Model], type[NexusModelAdmin]], ...] = (
    (Organization, OrganizationAdmin),
    (User, UserAdmin),
    (Run, RunAdmin),
    (UsageRecord, UsageRecordAdmin),
    (AuditEvent, AuditEventAdmin),
    (ProviderKey, ProviderKeyAdmin),
    (ApiKey, ApiKeyAdmin),
    (InstallationEvent, InstallationEventAdmin),
    (Operator, OperatorAdmin),
)


def register_all(site: admin.AdminSite) -> None:
    for model, model_admin in REGISTRY:
        site.register(model, model_admin)
