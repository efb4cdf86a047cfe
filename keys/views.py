"""Dashboard pages for provider keys: the list (everyone with ``keys:read``), adding (checked against the provider
right away), checking, revoking and "disable all" (``keys:write``). Every view goes through ``OrgViewMixin``, the
tenant gate.

The page that receives a key marks it sensitive (``sensitive_post_parameters`` / ``sensitive_variables``) so an
error report cannot show it, and the form's password input never renders it back.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.debug import sensitive_post_parameters, sensitive_variables

from keys import checking, selectors, services
from keys.forms import ProviderKeyForm
from keys.models import KeyStatus, ProviderKey
from keys.providers import ProbeResult, ProbeStatus
from orgs.mixins import OrgViewMixin
from orgs.models import Actor
from orgs.permissions import KEYS_READ, KEYS_WRITE

MODELS_SHOWN = 8


def _flash_check(request: HttpRequest, key: ProviderKey, result: ProbeResult) -> None:
    """The outcome of a check as a flash message, with a preview of the model list when there is one."""
    name = f"“{key.label}” ({key.masked})"
    note = f" {result.message}" if result.message else ""
    if result.status is ProbeStatus.VALID:
        shown = ", ".join(result.models[:MODELS_SHOWN])
        more = len(result.models) - MODELS_SHOWN
        listing = f" Models: {shown}{f' and {more} more' if more > 0 else ''}." if result.models else note
        messages.success(request, f"{name} is valid.{listing}")
    elif result.status is ProbeStatus.RESTRICTED:
        messages.warning(request, f"{name} is valid but restricted: it may not list models.{note}")
    elif result.status is ProbeStatus.INVALID:
        messages.error(request, f"{name} was rejected by the provider: it is invalid.{note}")
    else:
        messages.warning(request, f"{name} could not be checked; its status is unchanged.{note}")


def _check_and_flash(request: HttpRequest, key: ProviderKey, actor: Actor) -> None:
    try:
        result = checking.provider_key_check(key=key, actor=actor)
    except (services.ProviderKeyUnavailable, services.ProviderKeyDecryptionError) as exc:
        messages.error(request, str(exc))
        return
    _flash_check(request, key, result)


def _apply_service_errors(form: ProviderKeyForm, error: ValidationError) -> None:
    if not hasattr(error, "error_dict"):
        form.add_error(None, error)
        return
    for field, errors in error.error_dict.items():
        form.add_error(field if field in form.fields else None, errors)


@method_decorator(sensitive_post_parameters("secret"), name="dispatch")
class ProviderKeysView(OrgViewMixin, View):
    """The org's provider keys; admins also get the add form."""

    template_name = "keys/provider_keys.html"
    capabilities = {"GET": KEYS_READ, "POST": KEYS_WRITE}

    def get(self, request: HttpRequest) -> HttpResponse:
        return self._render(request, ProviderKeyForm())

    @method_decorator(sensitive_variables("secret", "form", "cleaned"))
    def post(self, request: HttpRequest) -> HttpResponse:
        form = ProviderKeyForm(request.POST)
        if form.is_valid():
            cleaned = form.cleaned_data
            try:
                key = services.provider_key_create(
                    org=self.org,
                    actor=self.org_context.actor,
                    provider=cleaned["provider"],
                    label=cleaned["label"],
                    secret=cleaned["secret"],
                    base_url=cleaned["base_url"],
                )
            except ValidationError as exc:
                _apply_service_errors(form, exc)
            else:
                messages.success(request, f"The key “{key.label}” ({key.masked}) was added.")
                # Checked at once: a typo in the key or the base URL shows up now, not in the first run.
                _check_and_flash(request, key, self.org_context.actor)
                return redirect("keys:provider_keys")
        return self._render(request, form, status=400)

    def _render(self, request: HttpRequest, form: ProviderKeyForm, status: int = 200) -> HttpResponse:
        keys = selectors.provider_keys_for_org(org=self.org)
        data = {
            "org": self.org,
            "provider_keys": keys,
            "form": form,
            "can_write": self.org_context.can(KEYS_WRITE),
            "has_live_keys": any(k.status != KeyStatus.REVOKED for k in keys),
        }
        return render(request, self.template_name, data, status=status)


class ProviderKeyRevokeView(OrgViewMixin, View):
    http_method_names = ["post"]
    capability = KEYS_WRITE

    def post(self, request: HttpRequest, key_id: uuid.UUID) -> HttpResponse:
        key = selectors.provider_key_get_for_org(org=self.org, key_id=key_id)
        if key is None:
            raise Http404
        services.provider_key_revoke(key=key, actor=self.org_context.actor)
        messages.success(request, f"The key “{key.label}” was revoked. Runs can no longer use it.")
        return redirect("keys:provider_keys")


class ProviderKeyCheckView(OrgViewMixin, View):
    """Check one key against its provider now; the outcome comes back as a flash message on the list."""

    http_method_names = ["post"]
    capability = KEYS_WRITE

    def post(self, request: HttpRequest, key_id: uuid.UUID) -> HttpResponse:
        key = selectors.provider_key_get_usable_for_org(org=self.org, key_id=key_id)
        if key is None:
            raise Http404  # another org's key, a missing one and a revoked one: nothing to check here
        _check_and_flash(request, key, self.org_context.actor)
        return redirect("keys:provider_keys")


class ProviderKeysDisableAllView(OrgViewMixin, View):
    """A suspected leak: revoke every key of the org at once, after an explicit confirmation."""

    template_name = "keys/provider_keys_disable_all.html"
    capability = KEYS_WRITE

    def get(self, request: HttpRequest) -> HttpResponse:
        return self._render(request)

    def post(self, request: HttpRequest) -> HttpResponse:
        if request.POST.get("confirm") != "yes":
            return self._render(request, error="Tick the box to confirm.", status=400)
        count = services.provider_keys_disable_all(org=self.org, actor=self.org_context.actor)
        messages.success(request, f"{count} provider key(s) were revoked. Add new keys to run again.")
        return redirect("keys:provider_keys")

    def _render(self, request: HttpRequest, *, error: str = "", status: int = 200) -> HttpResponse:
        live = selectors.provider_keys_for_org(org=self.org).exclude(status=KeyStatus.REVOKED)
        data: dict[str, Any] = {"org": self.org, "live_count": live.count(), "error": error}
        return render(request, self.template_name, data, status=status)
