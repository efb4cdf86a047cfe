"""Dashboard forms: they validate input and show field errors; the services decide and write."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from django import forms
from django.contrib.auth import password_validation
from django.core.exceptions import ValidationError

from orgs import permissions
from orgs.models import Organization, Role, User
from orgs.services import MONTHLY_TOKEN_CAP_MAX
from orgs.validators import MAX_PASSWORD_LENGTH

# What each scope lets an API key do, in the words the API keys page shows next to its checkbox.
SCOPE_LABELS: dict[str, str] = {
    permissions.ORG_READ: "See the organization",
    permissions.MEMBERS_READ: "List members",
    permissions.KEYS_READ: "List provider keys (masked)",
    permissions.RUNS_WRITE: "Start runs",
    permissions.RUNS_READ: "See runs",
    permissions.USAGE_READ: "See usage",
    permissions.ORG_MANAGE: "Change organization settings",
    permissions.TEAM_MANAGE: "Manage the team",
    permissions.API_KEYS_MANAGE: "Manage org API keys",
    permissions.KEYS_WRITE: "Add, check and revoke provider keys",
    permissions.BILLING_MANAGE: "Manage billing",
    permissions.AUDIT_READ: "Read the audit trail",
}

MAX_API_KEY_EXPIRY_DAYS = 3650


def apply_service_errors(form: forms.Form, error: ValidationError, field_map: dict[str, str] | None = None) -> None:
    """Show a service's ValidationError on the form: on the matching field, or above the form."""
    if not hasattr(error, "error_dict"):
        form.add_error(None, error)
        return
    for field, errors in error.error_dict.items():
        name = (field_map or {}).get(field, field)
        form.add_error(name if name in form.fields else None, errors)


class DashboardForm(forms.Form):
    """Labels without Django's trailing colon: the layout already sets them apart."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("label_suffix", "")
        super().__init__(*args, **kwargs)


def _password_field(label: str = "Password") -> forms.CharField:
    # No max_length here: the MaximumLengthValidator (AUTH_PASSWORD_VALIDATORS) explains the limit in words.
    return forms.CharField(
        label=label,
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text=f"At least 10 characters, at most {MAX_PASSWORD_LENGTH}. Long passphrases are welcome.",
    )


class _NewPasswordMixin:
    """Runs Django's password validators (length, similarity, common, numeric, our maximum) with the would-be
    user, so a 5,000-character password is a field error and never reaches the hasher."""

    cleaned_data: dict[str, Any]

    def _email_for_validation(self) -> str:
        return str(self.cleaned_data.get("email") or "")

    def clean_password(self) -> str:
        password: str = self.cleaned_data["password"]
        candidate = User(email=self._email_for_validation(), name=str(self.cleaned_data.get("name") or ""))
        password_validation.validate_password(password, user=candidate)
        return password


class SignupForm(_NewPasswordMixin, DashboardForm):
    email = forms.EmailField(max_length=254, widget=forms.EmailInput(attrs={"autocomplete": "email"}))
    name = forms.CharField(max_length=150, required=False, label="Your name")
    org_name = forms.CharField(max_length=100, label="Organization name")
    password = _password_field()

    field_order = ["email", "name", "org_name", "password"]

    def clean_email(self) -> str:
        return User.objects.normalize_email(self.cleaned_data["email"]).lower()


class InvitationSignupForm(_NewPasswordMixin, DashboardForm):
    """An invitee creates an account for the invited email; the email is fixed by the invitation."""

    name = forms.CharField(max_length=150, required=False, label="Your name")
    password = _password_field()

    def __init__(self, *args: Any, email: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.invited_email = email

    def _email_for_validation(self) -> str:
        return self.invited_email


class LoginForm(DashboardForm):
    email = forms.EmailField(
        max_length=254, widget=forms.EmailInput(attrs={"autocomplete": "email", "autofocus": True})
    )
    # Bounded so nobody makes us hash megabytes; real passwords are at most MAX_PASSWORD_LENGTH anyway.
    password = forms.CharField(
        strip=False,
        max_length=MAX_PASSWORD_LENGTH,
        widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
    )

    def clean_email(self) -> str:
        return User.objects.normalize_email(self.cleaned_data["email"]).lower()


class OrganizationForm(DashboardForm):
    """Creating an organization, and its settings page (the name is all there is to set today)."""

    name = forms.CharField(max_length=Organization._meta.get_field("name").max_length, label="Organization name")

    def clean_name(self) -> str:
        name = str(self.cleaned_data["name"]).strip()
        if not name:
            raise ValidationError("An organization needs a name.")
        return name


class OrgSettingsForm(OrganizationForm):
    """The settings page: the name, and for those who manage billing, the monthly token cap."""

    monthly_token_cap = forms.IntegerField(
        label="Monthly token cap",
        required=False,
        min_value=1,
        max_value=MONTHLY_TOKEN_CAP_MAX,
        widget=forms.NumberInput(attrs={"placeholder": "No cap", "step": "1"}),
        help_text="Input + output tokens per calendar month (UTC) across all runs and proxy calls. Once reached, "
        "new runs and proxy calls are refused with a clear error until the month ends. Leave empty for no cap.",
    )

    agents_may_run_commands = forms.BooleanField(
        label="Agents may run commands",
        required=False,
        help_text="Agent runs may execute commands (tests, builds) in their sandboxed workspace. Off: agents only "
        "read and write files.",
    )

    def __init__(self, *args: Any, with_cap: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not with_cap:
            del self.fields["monthly_token_cap"]


class InvitationForm(DashboardForm):
    email = forms.EmailField(max_length=254)
    role = forms.ChoiceField(choices=Role.choices, initial=Role.DEVELOPER)

    def clean_email(self) -> str:
        return User.objects.normalize_email(self.cleaned_data["email"]).lower()


class RoleForm(DashboardForm):
    role = forms.ChoiceField(choices=Role.choices)


class MemberRemoveForm(DashboardForm):
    # An unticked checkbox is simply absent from the POST: absent means keep the keys.
    revoke_api_keys = forms.BooleanField(required=False)


class OrgSwitchForm(DashboardForm):
    org = forms.UUIDField()


class ApiKeyForm(DashboardForm):
    """Scopes offered are the creator's own capabilities; the default is the developer set."""

    name = forms.CharField(max_length=100)
    scopes = forms.MultipleChoiceField(widget=forms.CheckboxSelectMultiple, choices=())
    expires_in_days = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_API_KEY_EXPIRY_DAYS,
        label="Expires after (days)",
        help_text="Leave empty for a key that does not expire.",
    )

    def __init__(self, *args: Any, capabilities: Iterable[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        allowed = sorted(set(capabilities) & permissions.ALL_CAPABILITIES)
        scopes = cast(forms.MultipleChoiceField, self.fields["scopes"])
        scopes.choices = [(scope, f"{scope} — {SCOPE_LABELS.get(scope, scope)}") for scope in allowed]
        scopes.initial = sorted(permissions.DEFAULT_API_KEY_SCOPES & set(allowed))


class SignupConfirmForm(forms.Form):
    """The password chosen at sign-up, asked again when confirming the address."""

    password = forms.CharField(
        widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}), max_length=4096, strip=False
    )
