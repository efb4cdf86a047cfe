"""The tenant gate for the REST API: every org-scoped endpoint subclasses ``OrgAPIView``.

``initial()`` authenticates (``orgs.authentication.OrgAuthentication``: the one path; the gate's subclass of it
holds a recently verified key until the rate limits' round trip has read the authorization generation, and
verifies it again if anything changed), resolves the org from the credential, refuses a suspended org (403
``org_suspended``) and checks the capability the view declares for the request's method. Subclasses declare
``capabilities`` and read ``self.org``; they cannot skip the gate: defining ``initial``, ``dispatch`` or their own
authentication or permission classes is a ``TypeError`` at import time, and a view without a declaration refuses
to serve.
"""

from __future__ import annotations

from inspect import getattr_static
from typing import Any, ClassVar

from django.contrib.auth.decorators import login_not_required
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import ImproperlyConfigured
from rest_framework import exceptions, status
from rest_framework.generics import GenericAPIView
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request

from cesaflow.lib.api import ApiError, SafeJSONParser, check_query_and_path
from cesaflow.lib.api_schema import ApiAutoSchema
from cesaflow.lib.ratelimit import RateLimited
from orgs import rate_limits
from orgs.authentication import (
    ApiKeyUser,
    AuthenticationError,
    KeyPrincipal,
    OrgGateAuthentication,
    Principal,
    SessionPrincipal,
    api_key_verify,
    held_generation,
    request_api_key,
)
from orgs.models import ApiKey, Organization, User
from orgs.permissions import ORG_SUSPENDED, suspension_message
from orgs.sessions.store import SessionRecord
from orgs.tenancy import OrgContext, context_for_api_key, context_for_session

# What a subclass may not redefine, nor pass to ``as_view``: each would let it run without the gate, or with another.
GATE_ATTRIBUTES = frozenset(
    {
        "as_view",
        "initial",
        "dispatch",
        "initialize_request",
        "_verify_again",
        "authentication_classes",
        "permission_classes",
        "get_authenticators",
        "get_permissions",
        "check_permissions",
        "perform_authentication",
        "_resolve_context",
    }
)


class OrgAPIView(GenericAPIView):  # type: ignore[type-arg]
    #: HTTP method -> capability required, e.g. ``{"GET": KEYS_READ, "POST": KEYS_WRITE}``.
    capabilities: ClassVar[dict[str, str]] = {}

    authentication_classes = [OrgGateAuthentication]
    permission_classes = [IsAuthenticated]
    # JSON only, with deep nesting a 400 (settings name DRF's parser; this one is it, hardened).
    parser_classes = [SafeJSONParser]
    # Documents the errors every operation can give (cesaflow.lib.api.ApiAutoSchema).
    schema = ApiAutoSchema()
    org_context: OrgContext

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Whatever the MRO (mixins before or after this class), each gate attribute must still be this class's.
        bypass = sorted(
            name for name in GATE_ATTRIBUTES if getattr_static(cls, name, None) is not getattr_static(OrgAPIView, name)
        )
        if bypass:
            raise TypeError(f"{cls.__name__} may not redefine {', '.join(bypass)}: OrgAPIView's gate is final.")

    @classmethod
    def as_view(cls, **initkwargs: Any) -> Any:
        overridden = sorted(GATE_ATTRIBUTES & set(initkwargs))
        if overridden:
            raise TypeError(f"as_view() may not set {', '.join(overridden)}: OrgAPIView's gate is final.")
        # API clients authenticate per request (x-api-key); the gate below enforces authentication.
        return login_not_required(super().as_view(**initkwargs))

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        try:
            super().initial(request, *args, **kwargs)  # authentication, IsAuthenticated, throttles
        except (exceptions.NotAuthenticated, exceptions.AuthenticationFailed):
            # No credential, or a bad one: counted per client IP; past the limit a 429 instead of the 401.
            rate_limits.api_unauthenticated(request._request)
            raise
        check_query_and_path(request, kwargs)  # repeated parameters and NUL bytes: 400 before any lookup
        if not self.capabilities:
            raise ImproperlyConfigured(f"{type(self).__name__} declares no capabilities.")
        # HEAD is a GET without a body: it needs what GET needs (else every HEAD would be a 405).
        method = "GET" if request.method == "HEAD" else (request.method or "")
        required = self.capabilities.get(method)
        if required is None:
            raise exceptions.MethodNotAllowed(request.method or "")
        context = self._resolve_context(request)
        generation = held_generation(request)
        if generation is None:
            rate_limits.api_call(request._request, context)  # per key (or user) and per org: 429 past a limit
        else:
            # A key held by the authentication (``OrgGateAuthentication``): counted, and the current generation
            # read, in one round trip; trusted only under the generation it was verified under, else verified
            # again before anything else happens. A key that verifies counts once in its own and its org's limits,
            # as on the other path; one that no longer does has cost them this request (once per process: it is
            # then forgotten) and is answered as any bad key. Only the checks above, which read nothing of the
            # key (a malformed query, a method the view does not serve), answer before it is confirmed.
            exceeded, token = rate_limits.api_call_and_generation(request._request, context)
            if token is None or token != generation:
                context = self._verify_again(request)
            if exceeded is not None:
                raise RateLimited(exceeded, rate_limits.message(exceeded))
        if context.org.is_suspended:
            # Every org-scoped endpoint, reads included: the dashboard is where a suspended org's members read.
            raise ApiError(status.HTTP_403_FORBIDDEN, ORG_SUSPENDED, suspension_message(context.org))
        if not context.can(required):
            raise exceptions.PermissionDenied("Your role or API key scope does not allow this action.")
        self.org_context = context

    @staticmethod
    def _verify_again(request: Request) -> OrgContext:
        """A held key that something may have changed since: verified as on a first request (``api_key_verify``),
        with ``initial``'s answers to a bad one."""
        try:
            api_key = api_key_verify(request_api_key(request._request) or "")
        except AuthenticationError as exc:
            request.user, request.auth = AnonymousUser(), None  # as DRF leaves a request that failed authentication
            rate_limits.api_unauthenticated(request._request)
            raise exceptions.AuthenticationFailed(exc.message, code=exc.code) from None
        request.user = ApiKeyUser(api_key)  # type: ignore[assignment]  # as OrgAuthentication returns it to DRF
        request.auth = api_key
        return context_for_api_key(api_key)

    @staticmethod
    def _resolve_context(request: Request) -> OrgContext:
        if isinstance(request.auth, ApiKey):
            return context_for_api_key(request.auth)
        context = context_for_session(request._request)
        if context is None:
            # Logged in, but a member of no organization: nothing here is theirs.
            raise exceptions.NotFound("You are not a member of any organization.")
        return context

    @property
    def org(self) -> Organization:
        return self.org_context.org

    @property
    def principal(self) -> Principal:
        """Who authenticated this request (for streams that re-check it while open)."""
        auth, user = self.request.auth, self.request.user
        if isinstance(auth, ApiKey):
            return KeyPrincipal(auth)
        if isinstance(auth, SessionRecord) and isinstance(user, User):
            return SessionPrincipal(user, auth)
        raise exceptions.NotAuthenticated  # unreachable behind the gate: it only lets these two through
