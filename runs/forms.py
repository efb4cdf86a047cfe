"""Dashboard forms for runs and usage: they check shape and show errors; ``runs.services`` decides and writes."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import date
from typing import Any, ClassVar, cast

from django import forms

from keys.models import KeyStatus, ProviderKey
from orgs.forms import DashboardForm
from runs.models import RunKind, RunStatus
from runs.services import MODEL_MAX_CHARS, OBJECTIVE_MAX_CHARS
from runs.usage import PeriodError, UsagePeriod, usage_period


class RunFilterForm(forms.Form):
    status = forms.ChoiceField(required=False, choices=[("", "All statuses"), *RunStatus.choices])


class RunCreateForm(DashboardForm):
    """Objective, one of the org's usable provider keys, and a model: picked from the key's model list (when it
    is known) or typed. Whether the key is really the org's, and usable, is the service's call."""

    kind = forms.ChoiceField(
        label="Kind",
        choices=[
            (RunKind.CHAT, "Chat: one streamed answer"),
            (RunKind.AGENT, "Agent: writes and runs code in a sandboxed workspace, downloadable as a zip"),
        ],
        initial=RunKind.CHAT,
        required=False,
    )
    objective = forms.CharField(
        max_length=OBJECTIVE_MAX_CHARS,
        widget=forms.Textarea(attrs={"rows": 6, "placeholder": "What should the model do?"}),
        help_text="Sent to the model with a short system prompt and kept as the run's title. The answer is "
        "streamed to you and never stored.",
    )
    provider_key = forms.ChoiceField(label="Provider key", choices=())
    # A select, but not a ChoiceField: runs-live.js fills it from the key's model list after the page loaded,
    # and the service, not a stale list, decides what a valid model is.
    model = forms.CharField(label="Model", required=False, max_length=MODEL_MAX_CHARS, widget=forms.Select())
    custom_model = forms.CharField(
        label="Or type a model id",
        max_length=MODEL_MAX_CHARS,
        required=False,
        widget=forms.TextInput(attrs={"spellcheck": "false", "autocomplete": "off", "placeholder": "e.g. gpt-4o-mini"}),
        help_text="For a model the list does not offer. Takes precedence over the list.",
    )

    def __init__(
        self,
        *args: Any,
        provider_keys: Sequence[ProviderKey],
        models_by_key: Mapping[str, Sequence[str]],
        unchecked: Collection[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        key_field = cast(forms.ChoiceField, self.fields["provider_key"])
        key_field.choices = [
            (str(key.id), key_choice_label(key, checked=str(key.id) not in unchecked)) for key in provider_keys
        ]
        # One group per key, so the list reads without JavaScript; runs-live.js narrows it to the chosen key.
        groups = [
            (key.label, [(m, m) for m in models_by_key[str(key.id)]])
            for key in provider_keys
            if models_by_key.get(str(key.id))
        ]
        model_widget = cast(forms.Select, self.fields["model"].widget)
        model_widget.choices = [("", "Choose a model…"), *groups]
        self.has_model_list = bool(groups)
        if not self.has_model_list:
            self.fields["custom_model"].label = "Model"
            self.fields["custom_model"].help_text = "The model id, as the provider names it."

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        custom = str(data.get("custom_model") or "").strip()
        chosen = custom or str(data.get("model") or "").strip()
        if not chosen and "model" not in self.errors and "custom_model" not in self.errors:
            self.add_error("model" if self.has_model_list else "custom_model", "Choose or type a model.")
        data["model"] = chosen
        return data


def key_choice_label(key: ProviderKey, *, checked: bool = True) -> str:
    """The key as the form's select shows it; ``checked=False``: no cached check (``keys.checking``), so its model
    list is unknown until an Admin checks it."""
    label = f"{key.label} · {key.get_provider_display()} ({key.masked})"
    if key.status == KeyStatus.INVALID:
        return f"{label} — marked invalid"
    return label if checked else f"{label} — not checked yet"


class UsageFilterForm(forms.Form):
    """Whole UTC days; ``until`` is inclusive. Empty means this month so far."""

    since = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        since: date | None = data.get("since")
        until: date | None = data.get("until")
        if "since" in self.errors or "until" in self.errors:
            return data
        try:
            data["period"] = usage_period(since, until)
        except PeriodError as exc:
            self.add_error(exc.field, exc.message)
        return data

    @property
    def period(self) -> UsagePeriod:
        period: UsagePeriod = self.cleaned_data["period"]
        return period


class AgentLimitsForm(DashboardForm):
    """The org's own budgets for agent runs; empty fields follow the deployment's defaults (shown as
    placeholders). Whether a value is within the deployment's caps is the service's call."""

    max_steps = forms.IntegerField(label="Model turns per run", required=False, min_value=1)
    max_tokens = forms.IntegerField(label="Tokens per run (input + output)", required=False, min_value=1)
    wall_clock_minutes = forms.IntegerField(label="Minutes per run", required=False, min_value=1)
    command_timeout_s = forms.IntegerField(label="Seconds per command (default)", required=False, min_value=1)

    # Form field -> AgentLimits field, and the factor from the form's unit to the limit's.
    FIELDS: ClassVar[dict[str, tuple[str, int]]] = {
        "max_steps": ("max_steps", 1),
        "max_tokens": ("max_tokens", 1),
        "wall_clock_minutes": ("wall_clock_s", 60),
        "command_timeout_s": ("command_timeout_s", 1),
    }

    def __init__(self, *args: Any, defaults: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name, (limit, factor) in self.FIELDS.items():
            placeholder = f"{int(defaults[limit] // factor):,} (default)"
            self.fields[name].widget.attrs["placeholder"] = placeholder

    @classmethod
    def initial_from(cls, overrides: Mapping[str, Any]) -> dict[str, int]:
        return {
            name: int(overrides[limit] // factor)
            for name, (limit, factor) in cls.FIELDS.items()
            if isinstance(overrides.get(limit), int | float)
        }

    def overrides(self) -> dict[str, int | float]:
        values: dict[str, int | float] = {}
        for name, (limit, factor) in self.FIELDS.items():
            value = self.cleaned_data.get(name)
            if value is not None:
                values[limit] = float(value * factor) if limit.endswith("_s") else int(value * factor)
        return values
