"""Nexus's own pages: sign-in (email + password + TOTP code), sign-out, and the one-time enrolment page.

``nexus.site.NexusSite`` routes to these; every one of them runs behind ``NexusSessionMiddleware`` (IP allowlist,
operator session) and is CSRF-protected.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core import signing
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.middleware.csrf import rotate_token
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.safestring import mark_safe

from cesaflow.lib.middleware import client_ip
from nexus import services
from nexus.forms import LOCKED_MESSAGE, SIGN_IN_FAILED_MESSAGE, EnrolForm, EnrolUnlockForm, SignInForm
from nexus.middleware import issue_cookie, operator_bind
from nexus.models import Operator
from nexus.selectors import operator_get_by_email, operator_get_for_enrolment_token
from nexus.sessions import ENDED, OperatorSession, operator_session_end, operator_session_start
from nexus.totp import totp_open, totp_qr_svg, totp_uri
from orgs import login_guard

ENROL_UNLOCK_SALT = "nexus.enrol.unlock"
ENROL_UNLOCK_SECONDS = 15 * 60

if TYPE_CHECKING:
    from nexus.site import NexusSite


def _safe_next(request: HttpRequest, site: NexusSite) -> str:
    """Where to go after signing in: a path inside Nexus, else its home page."""
    index = reverse("admin:index", current_app=site.name)
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target.startswith(index) and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        return target
    return index


def _context(request: HttpRequest, site: NexusSite, **extra: Any) -> dict[str, Any]:
    request.current_app = site.name
    return {**site.each_context(request), "has_permission": False, **extra}


def _render_sign_in(
    request: HttpRequest, site: NexusSite, form: SignInForm, *, status: int = 200, retry_after: int | None = None
) -> TemplateResponse:
    context = _context(request, site, title="Sign in", form=form, next=_safe_next(request, site))
    response = TemplateResponse(request, "nexus/login.html", context, status=status)
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    return response


def sign_in(request: HttpRequest, site: NexusSite) -> HttpResponse:
    if request.method == "GET":
        if site.has_permission(request):
            return HttpResponseRedirect(reverse("admin:index", current_app=site.name))
        return _render_sign_in(request, site, SignInForm())
    if request.method != "POST":
        return HttpResponseNotAllowed(["GET", "POST"])
    form = SignInForm(request.POST)
    if not form.is_valid():
        return _render_sign_in(request, site, form)
    email: str = form.cleaned_data["email"]
    ip = client_ip(request)
    # Counted apart from the dashboard's failures (another namespace): neither door can lock the other.
    lockout = login_guard.login_lockout(email=email, ip=ip, namespace=login_guard.NEXUS)
    if lockout is not None:  # refused before any factor is checked; still one failed attempt in the trail
        authentication = services.Authentication(
            operator=None, known=operator_get_by_email(email=email), failure=services.FAILED_LOCKED_OUT
        )
    else:
        authentication = services.operator_authenticate(
            email=email, password=form.cleaned_data["password"], code=form.cleaned_data["code"]
        )
        operator = authentication.operator
        if operator is not None:
            login_guard.login_success_record(email=email, namespace=login_guard.NEXUS)
            _start_session(request, operator)
            return HttpResponseRedirect(_safe_next(request, site))
        if authentication.failure == services.FAILED_CODES_LOCKED:
            services.operator_sign_in_failed(email=email, authentication=authentication)
            form.add_error(None, LOCKED_MESSAGE.format(minutes=max(1, settings.LOGIN_LOCKOUT_SECONDS // 60)))
            return _render_sign_in(request, site, form, status=429, retry_after=settings.LOGIN_LOCKOUT_SECONDS)
        lockout = login_guard.login_failure_record(email=email, ip=ip, namespace=login_guard.NEXUS)
    services.operator_sign_in_failed(email=email, authentication=authentication)
    if lockout is not None:
        if lockout.fresh:
            services.operator_locked_out(email=email, scope=lockout.scope, known=authentication.known)
        form.add_error(None, LOCKED_MESSAGE.format(minutes=lockout.retry_after_minutes))
        return _render_sign_in(request, site, form, status=429, retry_after=lockout.retry_after)
    form.add_error(None, SIGN_IN_FAILED_MESSAGE)
    return _render_sign_in(request, site, form)


def _start_session(request: HttpRequest, operator: Operator) -> None:
    """A new session replaces any this browser had (a new token every time: no fixation)."""
    previous: OperatorSession | None = getattr(request, "nexus_session", None)
    if previous is not None:
        operator_session_end(previous)
    now = time.time()
    token, record = operator_session_start(
        operator=operator, ip=client_ip(request), user_agent=request.META.get("HTTP_USER_AGENT", ""), now=now
    )
    issue_cookie(request, token=token, record=record, now=now)
    rotate_token(request)  # a new CSRF secret with the new session
    services.operator_signed_in(operator=operator)


def sign_out(request: HttpRequest, site: NexusSite) -> HttpResponse:
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    record: OperatorSession | None = getattr(request, "nexus_session", None)
    operator: Operator | None = getattr(request, "nexus_operator", None)
    if record is not None:
        operator_session_end(record)
    if operator is not None:
        services.operator_signed_out(operator=operator)
    operator_bind(request, ENDED)
    response = HttpResponseRedirect(reverse("admin:login", current_app=site.name))
    response["Clear-Site-Data"] = '"cache"'  # not "cookies": that would sign the browser out of the dashboard too
    return response


def _unlock_token(operator: Operator) -> str:
    return signing.dumps(
        {"operator": str(operator.pk), "link": operator.enrolment_token_hash[:16]}, salt=ENROL_UNLOCK_SALT
    )


def _unlocked(value: str, operator: Operator) -> bool:
    try:
        data = signing.loads(value, salt=ENROL_UNLOCK_SALT, max_age=ENROL_UNLOCK_SECONDS)
    except signing.BadSignature:
        return False
    return bool(data == {"operator": str(operator.pk), "link": operator.enrolment_token_hash[:16]})


def _enrol_secret_page(
    request: HttpRequest, site: NexusSite, operator: Operator, form: EnrolForm, *, error: str = ""
) -> HttpResponse:
    uri = totp_uri(secret=totp_open(sealed=operator.totp_sealed, operator_id=operator.pk), email=operator.email)
    context = _context(
        request,
        site,
        title="Set up your authenticator",
        form=form,
        operator_email=operator.email,
        otpauth_uri=uri,
        qr_svg=mark_safe(totp_qr_svg(uri)),  # noqa: S308  # segno's markup of our own URI: no user-controlled HTML
        error=error,
    )
    return TemplateResponse(request, "nexus/enrol.html", context)


def _enrol_unlock_page(
    request: HttpRequest,
    site: NexusSite,
    operator: Operator,
    form: EnrolUnlockForm,
    *,
    status: int = 200,
    error: str = "",
) -> HttpResponse:
    context = _context(
        request, site, title="Set up your authenticator", unlock_form=form, operator_email=operator.email, error=error
    )
    return TemplateResponse(request, "nexus/enrol.html", context, status=status)


def enrol(request: HttpRequest, site: NexusSite, token: str) -> HttpResponse:
    """The one-time enrolment page. First the operator's password (a leaked link alone shows nothing, and guesses
    count like sign-in failures); then the secret as an ``otpauth://`` URI and a QR code, and a first code to
    confirm. Unknown, used and expired links all get the same 404."""
    operator = operator_get_for_enrolment_token(token=token)
    if operator is None or not operator.totp_sealed:
        raise Http404
    if request.method == "GET":
        return _enrol_unlock_page(request, site, operator, EnrolUnlockForm())
    if request.method != "POST":
        return HttpResponseNotAllowed(["GET", "POST"])
    if "code" in request.POST:  # the second step
        form = EnrolForm(request.POST)
        if not form.is_valid() or not _unlocked(form.cleaned_data["unlock"], operator):
            error = "Enter your password again: the page was open too long."
            return _enrol_unlock_page(request, site, operator, EnrolUnlockForm(), error=error)
        if services.operator_enrol_confirm(operator=operator, token=token, code=form.cleaned_data["code"]):
            return TemplateResponse(request, "nexus/enrolled.html", _context(request, site, title="Enrolled"))
        retry = EnrolForm(initial={"unlock": form.cleaned_data["unlock"]})
        error = "That code does not match. Check your device's clock and try the next code."
        return _enrol_secret_page(request, site, operator, retry, error=error)
    unlock_form = EnrolUnlockForm(request.POST)
    ip = client_ip(request)
    lockout = login_guard.login_lockout(email=operator.email, ip=ip, namespace=login_guard.NEXUS)
    if lockout is None and unlock_form.is_valid() and operator.check_password(unlock_form.cleaned_data["password"]):
        return _enrol_secret_page(request, site, operator, EnrolForm(initial={"unlock": _unlock_token(operator)}))
    if lockout is None:
        lockout = login_guard.login_failure_record(email=operator.email, ip=ip, namespace=login_guard.NEXUS)
    if lockout is not None:
        unlock_form.add_error(None, LOCKED_MESSAGE.format(minutes=lockout.retry_after_minutes))
        response = _enrol_unlock_page(request, site, operator, unlock_form, status=429)
        response["Retry-After"] = str(lockout.retry_after)
        return response
    unlock_form.add_error(None, "That is not your password.")
    return _enrol_unlock_page(request, site, operator, unlock_form)
