"""Dashboard views for runs and the audit trail (the audit page and its CSV export)."""

from __future__ import annotations

import csv
import json
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django import forms
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views import View

from orgs import permissions
from orgs.mixins import OrgViewMixin
from runs.models import AuditEvent
from runs.selectors import audit_events_for_org

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
        if since and until and since > until:
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
