"""Dashboard views for accounts, organizations, the team and org API keys.

Org pages go through ``OrgViewMixin`` (the tenant gate) with a declared capability per method; the public
pages (sign up, log in, invitation landing) say so with ``login_not_required``. Views validate with forms and
write only through ``orgs.services``. One-time secrets (an API key, an invitation link) are rendered straight
into the POST response and never stored anywhere, not even in the session, so a reload cannot show them again.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import authenticate
from django.contrib.auth.decorators import login_not_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.utils.http import url_has_allowed_host_and_scheme, urlencode
from django.views import View
from django.views.decorators.cache import never_cache
from django.views.decorators.debug import sensitive_post_parameters
from django.views.generic import TemplateView

from cesaflow.lib.middleware import client_ip
from orgs import login_guard, permissions, rate_limits, selectors, services
from orgs.forms import (
    ApiKeyForm,
    InvitationForm,
    InvitationSignupForm,
    LoginForm,
    MemberRemoveForm,
    OrganizationForm,
    OrgSettingsForm,
    OrgSwitchForm,
    RoleForm,
    SignupConfirmForm,
    SignupForm,
    apply_service_errors,
)
from orgs.mixins import OrgViewMixin
from orgs.models import Invitation, Role, User
from orgs.sessions.services import session_sign_in, session_sign_out
from orgs.tenancy import switch_org

LOGIN_FAILED_MESSAGE = "Email or password is incorrect."
LOCKED_MESSAGE = "Too many failed sign-in attempts. Sign-in is locked for about {minutes} minute(s); try again later."
INVALID_INVITATION_MESSAGE = "This invitation link is invalid, has expired or has already been used."
MAX_INVITATION_TOKEN_LENGTH = 128

public = method_decorator(login_not_required, name="dispatch")
secret_post = method_decorator(sensitive_post_parameters("password"), name="dispatch")


def _safe_next(request: HttpRequest, fallback: str = "orgs:home") -> str:
    """Where to go after logging in: ``next`` only if it stays on this site, else ``fallback``."""
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return reverse(fallback)


def _user(request: HttpRequest) -> User:
    """The logged-in user (LoginRequiredMiddleware has run; this narrows the type)."""
    user = request.user
    if not isinstance(user, User):
        raise Http404
    return user


# --- Overview ---------------------------------------------------------------------------------------


class HomeView(OrgViewMixin, TemplateView):
    template_name = "orgs/home.html"
    capability = permissions.ORG_READ

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        data = super().get_context_data(**kwargs)
        context = self.org_context
        data["membership"] = context.membership
        data["member_count"] = selectors.members_for_org(org=self.org).count()
        if context.can(permissions.API_KEYS_MANAGE):
            data["active_api_key_count"] = (
                selectors.api_keys_for_org(org=self.org).filter(revoked_at=None).exclude(expires_at__lte=timezone.now())
            ).count()
        if context.can(permissions.TEAM_MANAGE):
            data["pending_invitation_count"] = selectors.invitations_pending_for_org(org=self.org).count()
        return data


# --- Accounts ---------------------------------------------------------------------------------------


def _absolute_url_template(request: HttpRequest, view_name: str) -> str:
    """An absolute URL for a view taking ``token``, as a ``str.format`` template with a ``{token}`` field."""
    url = request.build_absolute_uri(reverse(view_name, kwargs={"token": "TOKEN"}))
    return url.replace("{", "{{").replace("}", "}}").replace("TOKEN", "{token}")


@public
@secret_post
@method_decorator(rate_limits.limit_posts(rate_limits.SIGNUP), name="dispatch")
class SignupView(View):
    """Sign-up never says whether an address has an account: every accepted form gets the same "check your inbox"
    page, and the mailbox decides (a confirmation link, or a note to the existing account's holder)."""

    template_name = "orgs/signup.html"

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if request.user.is_authenticated:  # already someone: "New organization" is the way to add an org
            return redirect("orgs:home")
        return super().dispatch(request, *args, **kwargs)

    def get(self, request: HttpRequest) -> HttpResponse:
        if not services.signup_is_open():
            return self._closed(request, status=200)
        return render(request, self.template_name, {"form": SignupForm()})

    def post(self, request: HttpRequest) -> HttpResponse:
        if not services.signup_is_open():
            return self._closed(request, status=403)
        form = SignupForm(request.POST)
        if form.is_valid():
            try:
                services.user_signup(
                    email=form.cleaned_data["email"],
                    password=form.cleaned_data["password"],
                    org_name=form.cleaned_data["org_name"],
                    name=form.cleaned_data["name"],
                    confirm_url_template=_absolute_url_template(request, "orgs:signup_confirm"),
                    login_url=request.build_absolute_uri(reverse("orgs:login")),
                )
            except ValidationError as exc:
                if getattr(exc, "code", None) == services.SIGNUP_CLOSED:
                    return self._closed(request, status=403)
                apply_service_errors(form, exc)
            else:
                # The same page, whoever owns the address (tests compare the bytes).
                hours = int(services.SIGNUP_CONFIRMATION_TTL.total_seconds() // 3600)
                return render(
                    request, "orgs/signup_sent.html", {"email": form.cleaned_data["email"], "link_hours": hours}
                )
        return render(request, self.template_name, {"form": form})

    def _closed(self, request: HttpRequest, *, status: int) -> HttpResponse:
        return render(request, "orgs/signup_closed.html", {"message": services.SIGNUP_CLOSED_MESSAGE}, status=status)


@public
@secret_post
@method_decorator(never_cache, name="dispatch")
@method_decorator(rate_limits.limit_posts(rate_limits.LOGIN), name="dispatch")
class SignupConfirmView(View):
    """The link mailed at sign-up. Opening it asks for the password chosen at sign-up; the POST activates the account
    and signs in. A mail scanner that fetches links cannot use it up, and neither a log reader nor someone who signed
    up with another person's address can sign in with it."""

    template_name = "orgs/signup_confirm.html"

    def get(self, request: HttpRequest, token: str) -> HttpResponse:
        if len(token) > MAX_INVITATION_TOKEN_LENGTH or services.signup_confirmation_get_pending(token=token) is None:
            return self._invalid(request)
        return render(request, self.template_name, {"confirm_path": request.path, "form": SignupConfirmForm()})

    def post(self, request: HttpRequest, token: str) -> HttpResponse:
        if len(token) > MAX_INVITATION_TOKEN_LENGTH:
            return self._invalid(request)
        pending = services.signup_confirmation_get_pending(token=token)
        if pending is None:
            return self._invalid(request)
        form = SignupConfirmForm(request.POST)
        if not form.is_valid():
            return render(request, self.template_name, {"confirm_path": request.path, "form": form})
        # Password guesses here count like sign-in failures (and lock the same way).
        email, ip = pending.user.email, client_ip(request)
        lockout = login_guard.login_lockout(email=email, ip=ip)
        if lockout is None:
            try:
                user, org = services.signup_confirm(token=token, password=form.cleaned_data["password"])
            except ValidationError as exc:
                if "password" not in getattr(exc, "error_dict", {}):
                    return self._invalid(request)
                lockout = login_guard.login_failure_record(email=email, ip=ip)
                if lockout is None:
                    apply_service_errors(form, exc)
                    return render(request, self.template_name, {"confirm_path": request.path, "form": form})
        if lockout is not None:
            form.add_error(None, LOCKED_MESSAGE.format(minutes=lockout.retry_after_minutes))
            response = render(request, self.template_name, {"confirm_path": request.path, "form": form}, status=429)
            response["Retry-After"] = str(lockout.retry_after)
            return response
        session_sign_in(request, user)
        switch_org(request, str(org.id))
        messages.success(request, f"Welcome to CesaFlow. You are the Admin of {org.name}.")
        return redirect("orgs:home")

    def _invalid(self, request: HttpRequest) -> HttpResponse:
        # 410 like a used invitation: the page says what happened and what to do next.
        return render(
            request,
            "orgs/signup_confirm_invalid.html",
            {"message": services.INVALID_SIGNUP_LINK_MESSAGE},
            status=410,
        )


@public
@secret_post
@method_decorator(never_cache, name="dispatch")
@method_decorator(rate_limits.limit_posts(rate_limits.LOGIN), name="dispatch")
class LoginView(View):
    """Email + password, one generic failure message, and a temporary lock per account and per IP."""

    template_name = "orgs/login.html"

    def get(self, request: HttpRequest) -> HttpResponse:
        if request.user.is_authenticated:
            return HttpResponseRedirect(_safe_next(request))
        return self._render(request, LoginForm())

    def post(self, request: HttpRequest) -> HttpResponse:
        form = LoginForm(request.POST)
        if not form.is_valid():
            return self._render(request, form)
        email: str = form.cleaned_data["email"]
        ip = client_ip(request)
        lockout = login_guard.login_lockout(email=email, ip=ip)
        if lockout is None:
            # authenticate() sends user_login_failed on a miss, which the audit trail records.
            user = authenticate(request, email=email, password=form.cleaned_data["password"])
            if user is not None:
                login_guard.login_success_record(email=email)
                session_sign_in(request, user)  # a new session id every time: no fixation
                return HttpResponseRedirect(_safe_next(request))
            lockout = login_guard.login_failure_record(email=email, ip=ip)
        if lockout is not None:
            form.add_error(None, LOCKED_MESSAGE.format(minutes=lockout.retry_after_minutes))
            response = self._render(request, form, status=429)
            response["Retry-After"] = str(lockout.retry_after)
            return response
        form.add_error(None, LOGIN_FAILED_MESSAGE)
        return self._render(request, form)

    def _render(self, request: HttpRequest, form: LoginForm, status: int = 200) -> HttpResponse:
        next_url = request.POST.get("next") or request.GET.get("next") or ""
        if next_url and not url_has_allowed_host_and_scheme(next_url, allowed_hosts={request.get_host()}):
            next_url = ""
        return render(request, self.template_name, {"form": form, "next": next_url}, status=status)


class LogoutView(View):
    http_method_names = ["post"]

    def post(self, request: HttpRequest) -> HttpResponse:
        session_sign_out(request)
        response = redirect("orgs:login")
        # Tell the browser to drop anything this session left behind (ASVS 14.3.1).
        response["Clear-Site-Data"] = '"cache", "cookies", "storage"'
        return response


# --- Organizations ----------------------------------------------------------------------------------


class OrgCreateView(View):
    """Any logged-in user may start an organization (and becomes its Admin); users with no org land here."""

    template_name = "orgs/org_create.html"

    def get(self, request: HttpRequest) -> HttpResponse:
        return render(request, self.template_name, {"form": OrganizationForm()})

    def post(self, request: HttpRequest) -> HttpResponse:
        form = OrganizationForm(request.POST)
        if form.is_valid():
            try:
                org = services.organization_create(name=form.cleaned_data["name"], admin=_user(request))
            except ValidationError as exc:
                apply_service_errors(form, exc)
            else:
                switch_org(request, str(org.id))
                messages.success(request, f"{org.name} is ready. You are its Admin.")
                return redirect("orgs:home")
        return render(request, self.template_name, {"form": form})


class OrgSwitchView(View):
    """Makes another of the user's orgs the current one. Not a member (or no such org): 404, the same answer."""

    http_method_names = ["post"]

    def post(self, request: HttpRequest) -> HttpResponse:
        form = OrgSwitchForm(request.POST)
        if not form.is_valid() or not switch_org(request, str(form.cleaned_data["org"])):
            raise Http404
        return redirect("orgs:home")


class SettingsView(OrgViewMixin, View):
    template_name = "orgs/settings.html"
    capability = permissions.ORG_MANAGE

    def _form(self, data: Any = None) -> OrgSettingsForm:
        # The token cap is a billing decision: only those who manage billing see (and can send) it.
        initial = {
            "name": self.org.name,
            "monthly_token_cap": self.org.monthly_token_cap,
            "agents_may_run_commands": self.org.agents_may_run_commands,
        }
        return OrgSettingsForm(data, initial=initial, with_cap=self.org_context.can(permissions.BILLING_MANAGE))

    def get(self, request: HttpRequest) -> HttpResponse:
        return self._render(request, self._form())

    def post(self, request: HttpRequest) -> HttpResponse:
        form = self._form(request.POST)
        if form.is_valid():
            changes: dict[str, Any] = {
                "name": form.cleaned_data["name"],
                "agents_may_run_commands": form.cleaned_data["agents_may_run_commands"],
            }
            if "monthly_token_cap" in form.fields:
                changes["monthly_token_cap"] = form.cleaned_data["monthly_token_cap"]
            try:
                services.org_update(org=self.org, actor=_user(request), **changes)
            except ValidationError as exc:
                apply_service_errors(form, exc)
            else:
                messages.success(request, "Settings saved.")
                return redirect("orgs:settings")
        return self._render(request, form)

    def _render(self, request: HttpRequest, form: OrgSettingsForm) -> HttpResponse:
        limits = rate_limits.limits_for_display()
        return render(request, self.template_name, {"form": form, "org": self.org, "rate_limits": limits})


# --- Team -------------------------------------------------------------------------------------------


class TeamView(OrgViewMixin, View):
    """Everyone sees who is in the org; Admins also manage roles, removals and invitations."""

    template_name = "orgs/team.html"
    capabilities = {"GET": permissions.MEMBERS_READ, "POST": permissions.TEAM_MANAGE}

    def get(self, request: HttpRequest) -> HttpResponse:
        return self._render(request, InvitationForm())

    def post(self, request: HttpRequest) -> HttpResponse:
        """Invite someone. The one-time link is shown in this response only."""
        form = InvitationForm(request.POST)
        if form.is_valid():
            accept_url_template = _absolute_url_template(request, "orgs:invite_accept")
            try:
                invitation, token = services.invitation_create(
                    org=self.org,
                    email=form.cleaned_data["email"],
                    role=form.cleaned_data["role"],
                    actor=_user(request),
                    accept_url_template=accept_url_template,
                )
            except ValidationError as exc:
                apply_service_errors(form, exc)
            else:
                link = request.build_absolute_uri(reverse("orgs:invite_accept", kwargs={"token": token}))
                return self._render(
                    request,
                    InvitationForm(),
                    new_invitation=invitation,
                    invitation_link=link,
                    emailed=settings.EMAIL_ENABLED,
                )
        return self._render(request, form)

    def _render(self, request: HttpRequest, form: InvitationForm, **extra: Any) -> HttpResponse:
        can_manage = self.org_context.can(permissions.TEAM_MANAGE)
        data: dict[str, Any] = {
            "org": self.org,
            "members": (
                selectors.members_for_org_with_api_key_counts(org=self.org)
                if can_manage
                else selectors.members_for_org(org=self.org)
            ),
            "can_manage": can_manage,
            "me": self.org_context.membership,
            "role_choices": Role.choices,
            **extra,
        }
        if can_manage:
            data["invitations"] = selectors.invitations_pending_for_org(org=self.org)
            data["form"] = form
        return render(request, self.template_name, data)


class MemberRoleView(OrgViewMixin, View):
    http_method_names = ["post"]
    capability = permissions.TEAM_MANAGE

    def post(self, request: HttpRequest, membership_id: uuid.UUID) -> HttpResponse:
        membership = selectors.membership_get_for_org(org=self.org, membership_id=membership_id)
        if membership is None:
            raise Http404
        form = RoleForm(request.POST)
        if not form.is_valid():
            messages.error(request, "Choose Admin or Developer.")
            return redirect("orgs:team")
        try:
            services.membership_change_role(membership=membership, role=form.cleaned_data["role"], actor=_user(request))
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
        else:
            messages.success(request, f"{membership.user.email} is now {membership.get_role_display()}.")
        return redirect("orgs:team")


class MemberRemoveView(OrgViewMixin, View):
    http_method_names = ["post"]
    capability = permissions.TEAM_MANAGE

    def post(self, request: HttpRequest, membership_id: uuid.UUID) -> HttpResponse:
        membership = selectors.membership_get_for_org(org=self.org, membership_id=membership_id)
        if membership is None:
            raise Http404
        email = membership.user.email
        form = MemberRemoveForm(request.POST)
        revoke_api_keys = form.is_valid() and bool(form.cleaned_data["revoke_api_keys"])
        try:
            services.membership_remove(membership=membership, actor=_user(request), revoke_api_keys=revoke_api_keys)
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
        else:
            kept = "" if revoke_api_keys else " Any API keys they created keep working until revoked."
            messages.success(request, f"{email} was removed from {self.org.name}.{kept}")
        return redirect("orgs:team")


class InvitationRevokeView(OrgViewMixin, View):
    http_method_names = ["post"]
    capability = permissions.TEAM_MANAGE

    def post(self, request: HttpRequest, invitation_id: uuid.UUID) -> HttpResponse:
        invitation = selectors.invitation_get_for_org(org=self.org, invitation_id=invitation_id)
        if invitation is None:
            raise Http404
        services.invitation_revoke(invitation=invitation, actor=_user(request))
        messages.success(request, f"The invitation for {invitation.email} was revoked.")
        return redirect("orgs:team")


@public
@secret_post
@method_decorator(never_cache, name="dispatch")
@method_decorator(rate_limits.limit_posts(rate_limits.INVITATION), name="dispatch")
class InviteAcceptView(View):
    """The invitation link. Logged in as the invited email: accept. Anonymous: create an account for that
    email (joining this org only) or log in first. A bad link gets a clear page, not a 404."""

    template_name = "orgs/invite_accept.html"

    def _invitation(self, token: str) -> Invitation | None:
        if len(token) > MAX_INVITATION_TOKEN_LENGTH:
            return None
        return services.invitation_get_pending(token=token)

    def get(self, request: HttpRequest, token: str) -> HttpResponse:
        invitation = self._invitation(token)
        if invitation is None:
            return self._invalid(request)
        form = None if request.user.is_authenticated else InvitationSignupForm(email=invitation.email)
        return self._render(request, token, invitation, form)

    def post(self, request: HttpRequest, token: str) -> HttpResponse:
        invitation = self._invitation(token)
        if invitation is None:
            return self._invalid(request)
        if request.user.is_authenticated:
            return self._accept_as_current_user(request, token, invitation)
        form = InvitationSignupForm(request.POST, email=invitation.email)
        if form.is_valid():
            try:
                user, membership = services.user_signup_from_invitation(
                    token=token, password=form.cleaned_data["password"], name=form.cleaned_data["name"]
                )
            except ValidationError as exc:
                apply_service_errors(form, exc)
            else:
                session_sign_in(request, user)
                switch_org(request, str(membership.org_id))
                messages.success(request, f"Welcome to {membership.org.name}.")
                return redirect("orgs:home")
        return self._render(request, token, invitation, form)

    def _accept_as_current_user(self, request: HttpRequest, token: str, invitation: Invitation) -> HttpResponse:
        try:
            membership = services.invitation_accept(token=token, user=_user(request))
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
            return self._render(request, token, invitation, None)
        switch_org(request, str(membership.org_id))
        messages.success(request, f"You joined {membership.org.name} as {membership.get_role_display()}.")
        return redirect("orgs:home")

    def _render(
        self, request: HttpRequest, token: str, invitation: Invitation, form: InvitationSignupForm | None
    ) -> HttpResponse:
        user = request.user
        email_matches = isinstance(user, User) and user.email.lower() == invitation.email.lower()
        data = {
            "invitation": invitation,
            "form": form,
            "email_matches": email_matches,
            "accept_path": request.path,
            "login_url": f"{reverse('orgs:login')}?{urlencode({'next': request.path})}",
        }
        return render(request, self.template_name, data)

    def _invalid(self, request: HttpRequest) -> HttpResponse:
        # 410, not 404: the page explains what happened and what to do next.
        return render(request, "orgs/invite_invalid.html", {"message": INVALID_INVITATION_MESSAGE}, status=410)


# --- Org API keys -----------------------------------------------------------------------------------


class ApiKeysView(OrgViewMixin, View):
    """List and create org API keys. A new key's secret appears in the creating response and nowhere else."""

    template_name = "orgs/api_keys.html"
    capability = permissions.API_KEYS_MANAGE

    def _form(self, data: Any = None) -> ApiKeyForm:
        return ApiKeyForm(data, capabilities=self.org_context.capabilities)

    def get(self, request: HttpRequest) -> HttpResponse:
        return self._render(request, self._form())

    def post(self, request: HttpRequest) -> HttpResponse:
        form = self._form(request.POST)
        if form.is_valid():
            days = form.cleaned_data["expires_in_days"]
            try:
                api_key, secret = services.api_key_create(
                    org=self.org,
                    name=form.cleaned_data["name"],
                    actor=_user(request),
                    scopes=list(form.cleaned_data["scopes"]),
                    expires_at=timezone.now() + timedelta(days=days) if days else None,
                )
            except ValidationError as exc:
                apply_service_errors(form, exc, field_map={"expires_at": "expires_in_days"})
            else:
                return self._render(request, self._form(), new_key=api_key, new_secret=secret)
        return self._render(request, form)

    def _render(self, request: HttpRequest, form: ApiKeyForm, **extra: Any) -> HttpResponse:
        data = {"org": self.org, "api_keys": selectors.api_keys_for_org(org=self.org), "form": form, **extra}
        return render(request, self.template_name, data)


class ApiKeyRevokeView(OrgViewMixin, View):
    http_method_names = ["post"]
    capability = permissions.API_KEYS_MANAGE

    def post(self, request: HttpRequest, api_key_id: uuid.UUID) -> HttpResponse:
        api_key = selectors.api_key_get_for_org(org=self.org, api_key_id=api_key_id)
        if api_key is None:
            raise Http404
        services.api_key_revoke(api_key=api_key, actor=_user(request))
        messages.success(request, f"The key “{api_key.name}” was revoked. It stops working on its next request.")
        return redirect("orgs:api_keys")
