"""Dashboard forms for provider keys: they check shape and show errors; ``keys.services`` validates and writes."""

from __future__ import annotations

from django import forms

from keys.models import Provider
from keys.services import LABEL_MAX_LENGTH, SECRET_MAX_LENGTH


class ProviderKeyForm(forms.Form):
    provider = forms.ChoiceField(choices=Provider.choices)
    label = forms.CharField(
        max_length=LABEL_MAX_LENGTH, help_text="A name for this key, unique in your organization (no “/”)."
    )
    # render_value=False: a re-rendered form (after an error) never echoes the key back into the page.
    # "new-password" stops browsers from autofilling the admin's own login password into this field.
    secret = forms.CharField(
        label="Key",
        max_length=SECRET_MAX_LENGTH,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password", "spellcheck": "false"}),
        help_text="Encrypted before it is stored. Only its last four characters are ever shown again.",
    )
    base_url = forms.CharField(
        label="Base URL",
        max_length=500,
        required=False,
        widget=forms.URLInput(attrs={"placeholder": "https://…"}),
        help_text="Optional: leave empty for the provider's official API. Required for OpenAI-compatible servers "
        "(Ollama, vLLM, LM Studio, gateways).",
    )
