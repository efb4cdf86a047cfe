"""Pages about the signed-in person's own sessions: the Sessions list with revoke per row, "Sign out everywhere",
and the password change (which ends every other session). No org is involved: these belong to the account."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from django.contrib import messages
from django.contrib.auth.forms import PasswordChangeForm
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.cache import never_cache
from django.views.decorators.debug import sensitive_post_parameters

from orgs.models import User
from orgs.sessions.services import (
    session_revoke,
    session_sign_out,
    sessions_for_user,
    sessions_revoke_all,
)
from orgs.sessions.store import SessionRecord

SESSION_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def _signed_in(request: HttpRequest) -> tuple[User, SessionRecord]:
    user, record = request.user, getattr(request, "cf_session", None)
    if not isinstance(user, User) or record is None:
        raise Http404  # LoginRequiredMiddleware sends anonymous visitors away first; this narrows the types
    return user, record


@method_decorator(never_cache, name="dispatch")
class SessionsView(View):
    template_name = "orgs/sessions.html"

    def get(self, request: HttpRequest) -> HttpResponse:
        user, current = _signed_in(request)
        rows = [
            {
                "record": record,
                "current": record.key == current.key,
                "created": datetime.fromtimestamp(record.created, tz=UTC),
                "last_seen": datetime.fromtimestamp(record.last_seen, tz=UTC),
            }
            for record in sessions_for_user(user=user)
        ]
        return render(request, self.template_name, {"rows": rows})


class SessionRevokeView(View):
    """Ends one session of the signed-in person (another device, or this one)."""

    http_method_names = ["post"]

    def post(self, request: HttpRequest, key: str) -> HttpResponse:
        user, current = _signed_in(request)
        if not SESSION_KEY_RE.match(key) or not session_revoke(user=user, key=key, actor=user):
            raise Http404  # not one of theirs, or already over: the same answer
        if key == current.key:
            session_sign_out(request)
            return redirect("orgs:login")
        messages.success(request, "That session was signed out. Its open pages stop within seconds.")
        return redirect("orgs:sessions")


class SignOutEverywhereView(View):
    http_method_names = ["post"]

    def post(self, request: HttpRequest) -> HttpResponse:
        user, _ = _signed_in(request)
        sessions_revoke_all(user=user, actor=user, reason="signed_out_everywhere")
        session_sign_out(request)
        response = redirect("orgs:login")
        response["Clear-Site-Data"] = '"cache", "cookies", "storage"'
        return response


@method_decorator(sensitive_post_parameters("old_password", "new_password1", "new_password2"), name="dispatch")
@method_decorator(never_cache, name="dispatch")
class PasswordChangeView(View):
    template_name = "orgs/password_change.html"

    def get(self, request: HttpRequest) -> HttpResponse:
        user, _ = _signed_in(request)
        return render(request, self.template_name, {"form": PasswordChangeForm(user)})

    def post(self, request: HttpRequest) -> HttpResponse:
        user, current = _signed_in(request)
        form = PasswordChangeForm(user, request.POST)
        if not form.is_valid():
            return render(request, self.template_name, {"form": form})
        form.save()
        ended = sessions_revoke_all(user=user, actor=user, keep=current.key, reason="password_changed")
        others = f" Your {ended} other session(s) were signed out." if ended else ""
        messages.success(request, f"Your password was changed.{others}")
        return redirect("orgs:sessions")
