"""Dashboard views for runs (list, new-run form, run page, cancel), usage (page and CSV) and the audit trail."""

from __future__ import annotations

import csv
import dataclasses
import json
import uuid
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views import View

from keys.checking import CachedCheck, cached_checks, provider_key_check
from keys.models import KeyStatus, ProviderKey
from keys.providers import ProbeStatus
from keys.selectors import provider_key_get_usable_for_org, provider_keys_for_org
from keys.services import ProviderKeyDecryptionError, ProviderKeyUnavailable
from orgs import permissions
from orgs.forms import apply_service_errors
from orgs.mixins import OrgViewMixin
from orgs.models import Organization
from runs.agent import AgentLimits
from runs.forms import AgentLimitsForm, RunCreateForm, RunFilterForm, UsageFilterForm
from runs.models import AuditEvent, Run, RunKind, RunStatus
from runs.selectors import audit_events_for_org, run_get_for_org, runs_for_org, tokens_used_this_month
from runs.services import agent_default_limits, org_agent_limits_set, run_create, run_request_cancel
from runs.usage import UsagePeriod, daily_chart_svg, usage_by, usage_daily, usage_details, usage_totals

AUDIT_PAGE_SIZE = 50
CSV_HEADER = ["time", "event", "actor", "actor_type", "target_type", "target_id", "ip", "user_agent", "metadata"]
# A spreadsheet treats a cell starting with one of these as a formula (OWASP "CSV injection"); tab and carriage
# return are on OWASP's list too because some importers strip them and then see the formula.
_FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


class AuditFilterForm(forms.Form):
    """Filters shared by the page and the CSV export. Dates are whole UTC days; ``until`` is inclusive."""

    event = forms.ChoiceField(required=False, choices=[("", "All events"), *((e, e) for e in AuditEvent.EVENTS)])
    actor = forms.CharField(required=False, max_length=254, help_text="Email, part of one, or a user/key id.")
    since = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        since, until = data.get("since"), data.get("until")
        if until is not None and until >= date.max:
            self.add_error("until", "Choose a date before the year 9999.")
        elif since and until and since > until:
            self.add_error("until", "“Until” must be on or after “Since”.")
        return data

    def events(self, org: Any) -> QuerySet[AuditEvent]:
        """The org's events matching the (valid) filters, newest first."""
        data = self.cleaned_data
        since: date | None = data.get("since")
        until: date | None = data.get("until")
        return audit_events_for_org(
            org=org,
            event=data.get("event") or None,
            actor=(data.get("actor") or "").strip() or None,
            since=datetime.combine(since, time.min, tzinfo=UTC) if since else None,
            # The selector's ``until`` is exclusive: the day after the chosen one makes the chosen day inclusive.
            until=datetime.combine(until + timedelta(days=1), time.min, tzinfo=UTC) if until else None,
        )


def neutralize_csv_cell(value: str) -> str:
    """Prefix a quote so spreadsheets show the text instead of evaluating it."""
    return f"'{value}" if value.startswith(_FORMULA_TRIGGERS) else value


def _metadata_text(value: Any) -> str:
    """One metadata value as readable text: lists joined, nested structures as compact JSON."""
    if isinstance(value, list):
        return ", ".join(_metadata_text(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return "" if value is None else str(value)


def _actor_text(event: AuditEvent) -> str:
    return event.actor_label or ("system" if event.actor_kind == "system" else "")


class AuditView(OrgViewMixin, View):
    template_name = "runs/audit.html"
    capability = permissions.AUDIT_READ

    def get(self, request: HttpRequest) -> HttpResponse:
        # Always bound (all filters are optional), so no filters means "everything".
        form = AuditFilterForm(request.GET)
        page = None
        if form.is_valid():
            page = Paginator(form.events(self.org), AUDIT_PAGE_SIZE).get_page(request.GET.get("page"))
        rows = [
            (event, [(key, _metadata_text(value)) for key, value in event.metadata.items()])
            for event in (page.object_list if page is not None else [])
        ]
        return render(request, self.template_name, {"org": self.org, "form": form, "page": page, "rows": rows})


class AuditCsvView(OrgViewMixin, View):
    """The same filters as the page, every matching row, as CSV."""

    capability = permissions.AUDIT_READ

    def get(self, request: HttpRequest) -> HttpResponse:
        form = AuditFilterForm(request.GET)
        if not form.is_valid():
            errors = "; ".join(f"{field}: {' '.join(str(m) for m in msgs)}" for field, msgs in form.errors.items())
            return HttpResponse(f"Invalid filters: {errors}\n", status=400, content_type="text/plain; charset=utf-8")
        filename = f"audit-{self.org.slug}-{timezone.now():%Y%m%d-%H%M%S}.csv"
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        writer = csv.writer(response)
        writer.writerow(CSV_HEADER)
        for event in form.events(self.org).iterator(chunk_size=1000):
            row = [
                event.created_at.isoformat(),
                event.event,
                _actor_text(event),
                event.actor_kind,
                event.target_type,
                event.target_id,
                event.ip or "",
                event.user_agent,
                json.dumps(event.metadata, sort_keys=True, ensure_ascii=False),
            ]
            writer.writerow([neutralize_csv_cell(str(cell)) for cell in row])
        return response


# --- Runs ---------------------------------------------------------------------------------------------------

RUNS_PAGE_SIZE = 50

# Why a run failed, in plain words, by ``Run.error_kind`` (the executor's kinds: runs.providers.events.ErrorKind
# plus the executor's own). The run page shows these, never provider text; run-stream.js reads the same table.
ERROR_EXPLANATIONS: dict[str, str] = {
    "auth": "The provider rejected the key. An Admin can check or replace it on the Provider keys page.",
    "permission": "The key is valid but not allowed to use this model or endpoint.",
    "billing_quota": "The provider account behind this key is out of credit or over its spending limit.",
    "rate_limit": "The provider kept rate-limiting this key, even after waiting and retrying.",
    "overloaded": "The provider was overloaded and kept refusing, even after retrying.",
    "server": "The provider had an internal error, even after retrying.",
    "bad_request": "The provider refused the request as invalid.",
    "not_found": "The provider does not know this model. Pick another one.",
    "too_large": "The objective is too long for this model.",
    "model_tool_error": "The model produced a malformed tool call.",
    "incomplete": "The provider's answer stopped before it was complete.",
    "timeout": "The provider stopped responding.",
    "deadline": "The run took longer than allowed and was stopped.",
    "network": "The connection to the provider failed.",
    "protocol": "The provider answered with something that is not a model's answer stream.",
    "blocked": "This server's egress policy does not allow the key's base URL.",
    "key_unavailable": "The provider key is no longer usable (revoked, or it could not be decrypted).",
    "worker_lost": "The process executing this run stopped, so the run could not finish.",
    "cancelled": "The run was cancelled.",
    "not_watched": "Nobody opened this run within its attach window, so it never called the provider and used no "
    "tokens. Start it again and keep its page open.",
    "internal": "CesaFlow failed while executing this run. The server log has the details.",
}


def explain_error(kind: str, message: str = "") -> str:
    """A failed or cancelled run's reason in plain words; our own stored message for kinds we do not know."""
    return ERROR_EXPLANATIONS.get(kind) or message or "The run failed."


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def run_creator(run: Run) -> str:
    """Who started a run: the user's current email, else the snapshot (an API key, a deleted user)."""
    if run.created_by_user is not None:
        return run.created_by_user.email
    return run.created_by_label or "—"


def _usable_keys(org: Organization) -> list[ProviderKey]:
    # Invalid keys stay offered (the admin may have fixed the account), after the ones known to work.
    keys = [k for k in provider_keys_for_org(org=org) if k.status != KeyStatus.REVOKED]
    return sorted(keys, key=lambda k: k.status == KeyStatus.INVALID)


def _key_checks(org: Organization, keys: list[ProviderKey]) -> dict[uuid.UUID, CachedCheck]:
    """Each key's cached check (one cache round trip, never a provider call); a key without one is not checked yet."""
    return cached_checks(org_id=org.id, key_ids=[key.id for key in keys])


def _models_by_key(
    org: Organization, keys: list[ProviderKey], checks: dict[uuid.UUID, CachedCheck] | None = None
) -> dict[str, list[str]]:
    """The model list of each key as far as its cached check knows it."""
    checks = _key_checks(org, keys) if checks is None else checks
    return {str(key_id): list(check.models) for key_id, check in checks.items() if check.models}


_NO_MODELS = {
    ProbeStatus.RESTRICTED: "This key may not list models: type the model id.",
    ProbeStatus.INVALID: "The provider rejected this key.",
    ProbeStatus.UNREACHABLE: "The provider's model list was unreachable at the last check: type the model id.",
}
NOT_CHECKED = "This key has not been checked yet: type the model id, or ask an Admin to check the key."


class RunModelsView(OrgViewMixin, View):
    """The model list of one of the org's keys, as JSON, for the new-run form: its cached check only. With nothing
    cached, an Admin (``keys:write``) checks the key now (audited ``key.used`` + ``key.checked``); anyone else is
    told it is not checked yet, so a Developer never causes a provider call (issue #14 point 5)."""

    capability = permissions.RUNS_WRITE

    def get(self, request: HttpRequest) -> JsonResponse:
        try:
            key_id = uuid.UUID(request.GET.get("provider_key", ""))
        except ValueError:
            key_id = None
        key = provider_key_get_usable_for_org(org=self.org, key_id=key_id) if key_id else None
        if key is None:
            return JsonResponse({"models": [], "message": "No such provider key."}, status=404)
        check = cached_checks(org_id=self.org.id, key_ids=[key.id]).get(key.id)
        if check is None and self.org_context.can(permissions.KEYS_WRITE):
            try:
                result = provider_key_check(key=key, actor=self.org_context.actor)
            except (ProviderKeyUnavailable, ProviderKeyDecryptionError) as exc:
                return JsonResponse({"models": [], "message": str(exc), "checked": False})
            check = CachedCheck(status=result.status, models=result.models, checked_at=0.0)
        if check is None:
            return JsonResponse({"models": [], "message": NOT_CHECKED, "checked": False})
        if check.status is ProbeStatus.VALID and check.models:
            return JsonResponse({"models": list(check.models), "message": "", "checked": True})
        message = _NO_MODELS.get(check.status, "The provider listed no models: type the model id.")
        return JsonResponse({"models": [], "message": message, "checked": True})


class RunListView(OrgViewMixin, View):
    """The org's runs, newest first; runs-live.js keeps statuses and token counts current."""

    template_name = "runs/run_list.html"
    capability = permissions.RUNS_READ

    def get(self, request: HttpRequest) -> HttpResponse:
        form = RunFilterForm(request.GET)
        status = form.cleaned_data.get("status") if form.is_valid() else None
        page = Paginator(runs_for_org(org=self.org, status=status or None), RUNS_PAGE_SIZE).get_page(
            request.GET.get("page")
        )
        data = {
            "org": self.org,
            "form": form,
            "page": page,
            "rows": [(run, run_creator(run)) for run in page.object_list],
            "filtered": bool(status),
            "can_create": self.org_context.can(permissions.RUNS_WRITE),
        }
        return render(request, self.template_name, data)


class RunCreateView(OrgViewMixin, View):
    """The new-run form: objective, one of the org's usable keys, a model; a valid POST starts the run."""

    template_name = "runs/run_new.html"
    capability = permissions.RUNS_WRITE
    keys: list[ProviderKey]
    models_by_key: dict[str, list[str]]

    def _form(self, data: Any = None) -> RunCreateForm:
        keys = _usable_keys(self.org)
        self.keys = keys
        checks = _key_checks(self.org, keys)
        self.models_by_key = _models_by_key(self.org, keys, checks)
        unchecked = {str(key.id) for key in keys if key.id not in checks}
        return RunCreateForm(data, provider_keys=keys, models_by_key=self.models_by_key, unchecked=unchecked)

    def get(self, request: HttpRequest) -> HttpResponse:
        return self._render(request, self._form())

    def post(self, request: HttpRequest) -> HttpResponse:
        form = self._form(request.POST)
        if form.is_valid():
            data = form.cleaned_data
            try:
                run = run_create(
                    org=self.org,
                    actor=self.org_context.actor,
                    provider_key_id=data["provider_key"],
                    model=data["model"],
                    objective=data["objective"],
                    kind=data["kind"] or RunKind.CHAT,
                    # The run page this form leads to attaches its stream, and the run starts then.
                    watch=True,
                )
            except ValidationError as exc:
                apply_service_errors(
                    form, exc, field_map={"model": "custom_model"} if not form.has_model_list else None
                )
            else:
                return redirect("runs:run_detail", run_id=run.id)
        return self._render(request, form, status=400)

    def _render(self, request: HttpRequest, form: RunCreateForm, status: int = 200) -> HttpResponse:
        cap = self.org.monthly_token_cap
        used = tokens_used_this_month(org=self.org) if cap is not None else None
        data = {
            "org": self.org,
            "form": form,
            "has_keys": bool(self.keys),
            "can_add_keys": self.org_context.can(permissions.KEYS_WRITE),
            "models_by_key": self.models_by_key,
            "cap": cap,
            "cap_used": used,
            "cap_reached": cap is not None and used is not None and used >= cap,
        }
        return render(request, self.template_name, data, status=status)


class RunDetailView(OrgViewMixin, View):
    """A run's metadata; while it is not finished, run-stream.js streams the answer into the page. The answer is
    never stored, so a reload of a finished run shows metadata only, and says so."""

    template_name = "runs/run_detail.html"
    capability = permissions.RUNS_READ

    def get(self, request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
        run = run_get_for_org(org=self.org, run_id=run_id)
        if run is None:
            raise Http404
        elapsed = None
        if run.started_at is not None:
            elapsed = format_duration(((run.finished_at or timezone.now()) - run.started_at).total_seconds())
        data = {
            "org": self.org,
            "run": run,
            "creator": run_creator(run),
            "elapsed": elapsed,
            "explanation": explain_error(run.error_kind, run.error_message) if run.error_kind else "",
            "can_cancel": self.org_context.can(permissions.RUNS_WRITE) and not run.is_terminal,
            "ws_path": f"/ws/runs/{run.id}/",
            "server_now": timezone.now(),
            "error_explanations": ERROR_EXPLANATIONS,
            "attach_window": int(settings.RUN_ATTACH_WINDOW_SECONDS),
            # What this run's commands ran in, or will run in (the configured mode, until the run starts).
            "sandbox_mode": run.sandbox_mode or settings.SANDBOX_MODE,
        }
        return render(request, self.template_name, data)


class RunCancelView(OrgViewMixin, View):
    """The no-JavaScript cancel button (run-stream.js cancels over the websocket when it is connected)."""

    http_method_names = ["post"]
    capability = permissions.RUNS_WRITE

    def post(self, request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
        run = run_get_for_org(org=self.org, run_id=run_id)
        if run is None:
            raise Http404
        try:
            run = run_request_cancel(run=run, actor=self.org_context.actor)
        except ValidationError as exc:
            messages.error(request, exc.messages[0])
            return redirect("runs:run_detail", run_id=run.id)
        if run.status == RunStatus.CANCELLED and run.cancel_requested_at is None:
            messages.success(request, "The run was cancelled before it started.")
        elif run.is_terminal and run.cancel_requested_at is None:
            messages.info(request, f"The run had already ended ({run.get_status_display().lower()}).")
        else:
            messages.success(request, "Cancelling: the provider call stops within a second.")
        return redirect("runs:run_detail", run_id=run.id)


# --- Usage --------------------------------------------------------------------------------------------------

USAGE_CSV_HEADER = [
    "day",
    "provider",
    "model",
    "member",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "calls",
    "incomplete_calls",
]


def _cap_context(org: Organization) -> dict[str, Any]:
    cap = org.monthly_token_cap
    if cap is None:
        return {"cap": None}
    used = tokens_used_this_month(org=org)
    return {
        "cap": cap,
        "cap_used": used,
        "cap_left": max(cap - used, 0),
        "cap_percent": min(100, round(used * 100 / cap)) if cap else 100,
        "cap_reached": used >= cap,
    }


class UsageView(OrgViewMixin, View):
    """Token usage of the org by provider, model and member, and per day as a server-rendered SVG chart."""

    template_name = "runs/usage.html"
    capability = permissions.USAGE_READ

    def get(self, request: HttpRequest) -> HttpResponse:
        form = UsageFilterForm(request.GET)
        data: dict[str, Any] = {"org": self.org, "form": form, **_cap_context(self.org)}
        if form.is_valid():
            period = form.period
            # Show the dates the page is about, defaults included, rather than empty inputs.
            data["form"] = UsageFilterForm({"since": period.since.isoformat(), "until": period.until.isoformat()})
            by_provider = usage_by(org=self.org, period=period, group_by="provider")
            daily = usage_daily(org=self.org, period=period)
            data.update(
                period=period,
                by_provider=by_provider,
                by_model=usage_by(org=self.org, period=period, group_by="model"),
                by_member=usage_by(org=self.org, period=period, group_by="member"),
                daily=daily,
                totals=usage_totals(by_provider),
                chart=daily_chart_svg(daily, title=f"Tokens per day (UTC), {period.since} to {period.until}"),
                is_this_month=period == UsagePeriod.this_month(),
            )
        return render(request, self.template_name, data, status=200 if form.is_valid() else 400)


class UsageCsvView(OrgViewMixin, View):
    """The period's ledger per day, provider, model and member, as CSV (same filters as the page)."""

    capability = permissions.USAGE_READ

    def get(self, request: HttpRequest) -> HttpResponse:
        form = UsageFilterForm(request.GET)
        if not form.is_valid():
            errors = "; ".join(f"{field}: {' '.join(str(m) for m in msgs)}" for field, msgs in form.errors.items())
            return HttpResponse(f"Invalid filters: {errors}\n", status=400, content_type="text/plain; charset=utf-8")
        period = form.period
        filename = f"usage-{self.org.slug}-{period.since:%Y%m%d}-{period.until:%Y%m%d}.csv"
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        writer = csv.writer(response)
        writer.writerow(USAGE_CSV_HEADER)
        for row in usage_details(org=self.org, period=period):
            cells = [
                row.day.isoformat(),
                row.provider,
                row.model,
                row.member,
                row.input_tokens,
                row.output_tokens,
                row.input_tokens + row.output_tokens,
                row.calls,
                row.incomplete_calls,
            ]
            # Model names are typed by users and labels come from them too: never let a spreadsheet run them.
            writer.writerow([neutralize_csv_cell(str(cell)) for cell in cells])
        return response


class AgentSettingsView(OrgViewMixin, View):
    """Admins set the org's own budgets for agent runs, within the deployment's caps."""

    template_name = "runs/agent_settings.html"
    capability = permissions.ORG_MANAGE

    def _form(self, data: Any = None) -> AgentLimitsForm:
        defaults = dataclasses.asdict(agent_default_limits())
        initial = AgentLimitsForm.initial_from(self.org.agent_limits or {})
        return AgentLimitsForm(data, initial=initial, defaults=defaults)

    def get(self, request: HttpRequest) -> HttpResponse:
        return self._render(request, self._form())

    def post(self, request: HttpRequest) -> HttpResponse:
        form = self._form(request.POST)
        if form.is_valid():
            try:
                org_agent_limits_set(org=self.org, actor=self.org_context.actor, overrides=form.overrides())
            except ValidationError as exc:
                form.add_error(None, exc.messages[0])
            else:
                messages.success(request, "Agent limits saved.")
                return redirect("runs:agent_settings")
        return self._render(request, form)

    def _render(self, request: HttpRequest, form: AgentLimitsForm) -> HttpResponse:
        caps = {
            "max_steps": AgentLimits.MAX_STEPS,
            "max_tokens": AgentLimits.MAX_TOKENS,
            "minutes": int(AgentLimits.MAX_WALL_CLOCK_S // 60),
            "command_s": int(AgentLimits.MAX_COMMAND_TIMEOUT_S),
        }
        data = {"form": form, "org": self.org, "caps": caps, "commands": self.org.agents_may_run_commands}
        return render(request, self.template_name, data)
