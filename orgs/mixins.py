"""The tenant gate for dashboard views: ``OrgViewMixin`` resolves the session's org and checks a capability."""

from __future__ import annotations

from inspect import getattr_static
from typing import Any

from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.http import HttpRequest, HttpResponseBase, HttpResponseNotAllowed
from django.shortcuts import redirect, render

from orgs.authentication import AuthenticationError, request_api_key
from orgs.models import Organization
from orgs.permissions import suspension_message
from orgs.tenancy import OrgContext, context_for_session


class OrgViewMixin:
    """Dashboard views that act inside the current org. Declare ``capability`` (or ``capabilities`` per method).

    LoginRequiredMiddleware has already sent anonymous visitors to the login page. A subclass cannot skip the gate:
    redefining ``dispatch`` is a ``TypeError`` at import time (put per-request setup in ``setup`` or the handler).
    """

    capability: str | None = None
    capabilities: dict[str, str] | None = None
    org_context: OrgContext

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr_static(cls, "dispatch") is not getattr_static(OrgViewMixin, "dispatch"):
            raise TypeError(f"{cls.__name__} may not redefine dispatch: OrgViewMixin's gate is final.")

    @classmethod
    def as_view(cls, **initkwargs: Any) -> Any:
        if "dispatch" in initkwargs:
            raise TypeError("as_view() may not set dispatch: OrgViewMixin's gate is final.")
        return super().as_view(**initkwargs)  # type: ignore[misc]

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        try:
            request_api_key(request)  # pages take no API key, but refuse a badly presented one like the API does
        except AuthenticationError as exc:
            return render(request, "errors/401.html", {"message": exc.message}, status=401)
        context = context_for_session(request)
        if context is None:
            return redirect("orgs:org_create")
        declared = self.capabilities or {}
        if self.capability is None and not declared:
            raise ImproperlyConfigured(f"{type(self).__name__} declares no capability.")
        # HEAD is a GET without a body, so it needs what GET needs (else a HEAD would be a 500).
        method = "GET" if request.method == "HEAD" else (request.method or "")
        required = declared.get(method, self.capability)
        if required is None:
            # Deny by default: a method the view declares no capability for is not offered at all.
            return HttpResponseNotAllowed(sorted(declared))
        if not context.can(required):
            raise PermissionDenied
        if context.org.is_suspended and method != "GET":
            # A suspended org's members may read their data, never change it (the banner says why).
            raise PermissionDenied(suspension_message(context.org))
        self.org_context = context
        return super().dispatch(request, *args, **kwargs)  # type: ignore[misc,no-any-return]

    @property
    def org(self) -> Organization:
        return self.org_context.org

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        data: dict[str, Any] = super().get_context_data(**kwargs)  # type: ignore[misc]
        data["org"] = self.org
        data["org_context"] = self.org_context
        return data
