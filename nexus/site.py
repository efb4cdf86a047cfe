"""``NexusSite``: the operators' Django admin, mounted at ``/<NEXUS_PREFIX>/`` when ``NEXUS_ENABLED``.

Who may see it is decided by Nexus's own session alone (``nexus.middleware``): ``has_permission`` wants an active,
enrolled operator on ``request.nexus_operator``; the dashboard's ``LoginRequiredMiddleware`` stands aside for
every Nexus URL (they are all ``login_not_required``), so there is exactly one gate. Sign-in, sign-out and the
enrolment page are Nexus's own (``nexus.views``); Django's password-change pages are switched off.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import update_wrapper
from typing import Any, TypeVar

from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.contrib.auth.decorators import login_not_required
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, URLResolver, path
from django.utils.decorators import method_decorator
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect

from nexus import views
from nexus.admin import register_all
from nexus.models import Operator

_View = TypeVar("_View", bound=Callable[..., Any])


def _exempt_from_dashboard_login(patterns: list[URLPattern | URLResolver]) -> None:
    """Marks every view under ``patterns`` ``login_not_required`` (the Nexus session gates them instead)."""
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            _exempt_from_dashboard_login(pattern.url_patterns)
        elif getattr(pattern.callback, "login_required", True):
            callback = pattern.callback

            def exempt(*args: Any, _callback: Callable[..., Any] = callback, **kwargs: Any) -> Any:
                return _callback(*args, **kwargs)

            pattern.callback = login_not_required(update_wrapper(exempt, callback))


class NexusSite(admin.AdminSite):
    site_header = "CesaFlow Nexus"
    site_title = "CesaFlow Nexus"
    index_title = "Home"
    site_url = None  # no "View site" link: the dashboard is another front door, with another session
    index_template = "nexus/index.html"
    enable_nav_sidebar = False

    def __init__(self, name: str = "nexus") -> None:
        super().__init__(name=name)
        # Nothing is deleted from Nexus: audit rows and run metadata outlive any operator's decision.
        self.disable_action("delete_selected")

    def has_permission(self, request: HttpRequest) -> bool:
        operator: Operator | None = getattr(request, "nexus_operator", None)
        return operator is not None and operator.is_active and operator.totp_enrolled_at is not None

    def admin_view(self, view: _View, cacheable: bool = False) -> _View:
        # Admin views are cache-free and CSRF-protected by the base; the dashboard's login requirement is not theirs.
        return login_not_required(super().admin_view(view, cacheable))

    def get_urls(self) -> list[URLPattern | URLResolver]:
        urls: list[URLPattern | URLResolver] = [
            path("enrol/<str:token>/", self.admin_view_public(self.enrol), name="enrol"),
            *super().get_urls(),
        ]
        _exempt_from_dashboard_login(urls)
        return urls

    def admin_view_public(self, view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        """A Nexus page that needs no operator session (enrolment): still cache-free and CSRF-protected."""
        return login_not_required(csrf_protect(never_cache(view)))

    def get_log_entries(self, request: HttpRequest) -> QuerySet[LogEntry]:
        # Django's LogEntry names dashboard users; operators' doings are in the installation trail instead.
        return LogEntry.objects.none()

    @method_decorator(csrf_protect)
    @method_decorator(never_cache)
    @login_not_required
    def login(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        return views.sign_in(request, self)

    # The base returns the "logged out" page; Nexus redirects to its sign-in page instead.
    def logout(  # type: ignore[override]
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        return views.sign_out(request, self)

    def index(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> TemplateResponse:
        """Home: who you are, health at a glance (nexus.health), and the lists."""
        from nexus.health import health_summary

        return super().index(request, {**(extra_context or {}), "health": health_summary()})

    def enrol(self, request: HttpRequest, token: str) -> HttpResponse:
        return views.enrol(request, self, token)

    def password_change(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> TemplateResponse:
        raise Http404  # operators' passwords are set with manage.py create_operator, not in the browser

    def password_change_done(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> TemplateResponse:
        raise Http404


nexus_site = NexusSite()
register_all(nexus_site)
