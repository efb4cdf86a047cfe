from __future__ import annotations

from django import forms

from orgs.validators import MAX_PASSWORD_LENGTH

SIGN_IN_FAILED_MESSAGE = "Email, password or code is incorrect."
LOCKED_MESSAGE = "Too many failed sign-in attempts. Try again in {minutes} minutes."


class SignInForm(forms.Form):
    """All three factors in one form: a failure never says which one was wrong."""

    email = forms.EmailField(max_length=254, widget=forms.EmailInput(attrs={"autocomplete": "username"}))
    password = forms.CharField(
        max_length=MAX_PASSWORD_LENGTH,
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
    )
    code = forms.CharField(
        label="Authenticator code",
        max_length=10,
        widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric"}),
    )


class EnrolUnlockForm(forms.Form):
    """The enrolment page's first step: the operator's password before the secret is shown (a leaked link alone
    reveals nothing)."""

    password = forms.CharField(
        label="Your password (from create_operator)",
        max_length=4096,
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
    )


class EnrolForm(forms.Form):
    code = forms.CharField(
        label="First code from your authenticator",
        max_length=10,
        widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric"}),
    )
    # Proof that the password was given on this page a moment ago (signed, 15 minutes): nexus.views.enrol.
    unlock = forms.CharField(widget=forms.HiddenInput, max_length=500)
