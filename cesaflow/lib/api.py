"""API conventions shared by every app: one error shape, strict input (types, NUL bytes, nesting, repeated
query parameters), cursor pagination. The schema that documents all of it is ``cesaflow.lib.api_schema``."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import InterfaceError, OperationalError
from django.db.models import Model, QuerySet
from django.http import Http404
from rest_framework import exceptions, pagination, parsers, permissions, renderers, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback

if TYPE_CHECKING:
    # Only for annotations: importing DRF's views here at runtime would import the authentication classes
    # (which import this module for pagination) in the middle of their own import.
    from rest_framework.views import APIView

logger = logging.getLogger("cesaflow.api")

_M = TypeVar("_M", bound=Model)
_R = TypeVar("_R")

_CODES = {
    status.HTTP_400_BAD_REQUEST: "invalid_request",
    status.HTTP_401_UNAUTHORIZED: "unauthenticated",
    status.HTTP_403_FORBIDDEN: "permission_denied",
    status.HTTP_404_NOT_FOUND: "not_found",
    status.HTTP_405_METHOD_NOT_ALLOWED: "method_not_allowed",
    status.HTTP_406_NOT_ACCEPTABLE: "not_acceptable",
    status.HTTP_409_CONFLICT: "conflict",
    status.HTTP_413_REQUEST_ENTITY_TOO_LARGE: "request_too_large",
    status.HTTP_415_UNSUPPORTED_MEDIA_TYPE: "unsupported_media_type",
    status.HTTP_429_TOO_MANY_REQUESTS: "rate_limited",
}


class ApiError(exceptions.APIException):
    """An API error with an explicit machine code: ``raise ApiError(409, "conflict", "...")``."""

    def __init__(self, status_code: int, code: str, message: str, details: dict[str, Any] | None = None):
        self.status_code = status_code
        self.code = code
        self.details = details or {}
        super().__init__(detail=message, code=code)


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def validation_error_from_django(exc: DjangoValidationError) -> exceptions.ValidationError:
    """A service's ``django.core.exceptions.ValidationError`` as DRF's, keeping the per-field messages.

    Services raise ``ValidationError({"field": "message"})`` for field problems and ``ValidationError("message")``
    for the request as a whole; the latter lands under ``non_field_errors`` like DRF's own.
    """
    if hasattr(exc, "error_dict"):
        return exceptions.ValidationError({field: list(messages) for field, messages in exc.message_dict.items()})
    return exceptions.ValidationError({"non_field_errors": list(exc.messages)})


# The database cannot be reached (PostgreSQL restarting, the pool out of connections): a temporary refusal that clients
# and load balancers retry, in the API's shape here and as a page elsewhere (``cesaflow.views``).
DATABASE_UNAVAILABLE_CODE = "database_unavailable"
DATABASE_UNAVAILABLE_MESSAGE = "CesaFlow cannot reach its database right now; try again shortly."
DATABASE_RETRY_AFTER_SECONDS = 5


def database_unavailable_response() -> Response:
    response = Response(error_body(DATABASE_UNAVAILABLE_CODE, DATABASE_UNAVAILABLE_MESSAGE), status=503)
    response["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
    response["Cache-Control"] = "no-store"
    return response


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Every API error is ``{"error": {"code", "message", "details"}}`` with the right status."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, DjangoValidationError):
        # A service refused the input: that is the client's 400, never a 500.
        exc = validation_error_from_django(exc)
    request = context.get("request")
    if request is not None:
        # Errors are JSON whatever the view negotiated for success (the schema's own media type, Redoc's HTML page,
        # an event stream): DRF renders the error response with the request's accepted renderer.
        request.accepted_renderer, request.accepted_media_type = renderers.JSONRenderer(), "application/json"
    response = drf_exception_handler(exc, context)
    if response is None and isinstance(exc, (OperationalError, InterfaceError)):
        logger.warning("API view %s: the database cannot be reached (%s)", type(context.get("view")).__name__, exc)
        return database_unavailable_response()
    if response is None:
        # A bug. Answered here in the one shape (Django's own 500 page, with DEBUG its HTML traceback, would
        # otherwise answer an API client); the traceback goes to the log, never to the client.
        view = context.get("view")
        logger.error("API view %s failed", type(view).__name__, exc_info=exc)
        set_rollback()  # nothing the failed request half-wrote is kept
        return Response(error_body("server_error", "Something went wrong on our side."), status=500)
    if isinstance(exc, ApiError):
        body = error_body(exc.code, str(exc.detail), exc.details)
    elif isinstance(exc, exceptions.ValidationError):
        data = response.data if isinstance(response.data, dict) else {"non_field_errors": response.data}
        body = error_body("validation_error", "The request is invalid.", {"fields": data})
    else:
        detail = response.data.get("detail", "") if isinstance(response.data, dict) else response.data
        code = getattr(getattr(exc, "detail", None), "code", None)
        if not isinstance(code, str) or code in {"error", "invalid"}:
            code = _CODES.get(response.status_code, "error")
        code = {"not_authenticated": "unauthenticated", "authentication_failed": "unauthenticated"}.get(code, code)
        body = error_body(code, str(detail))
    response.data = body
    return response


# --- Schema of the error shape (for extend_schema ``responses=``) ------------------------------------


class ErrorDetailSerializer(serializers.Serializer[Any]):
    code = serializers.CharField(help_text="Machine-readable, snake_case, stable.")
    message = serializers.CharField(help_text="For humans; may change.")
    details = serializers.DictField(help_text="Extra facts, e.g. `fields` for validation errors.")


class ErrorSerializer(serializers.Serializer[Any]):
    error = ErrorDetailSerializer()


def error_responses(*statuses: int) -> dict[int, type[ErrorSerializer]]:
    """``responses=`` entries documenting the error shape for the given statuses."""
    return dict.fromkeys(statuses, ErrorSerializer)


# --- Input ------------------------------------------------------------------------------------------


MAX_JSON_DEPTH = 32  # our bodies nest 3 deep at most; deeper is an attack on the parser or the database


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value, keys included, without recursion (the value may be deep)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, Mapping | list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, Mapping) else item))
    return deepest


def has_nul(value: Any) -> bool:
    """A NUL byte anywhere in the value: PostgreSQL refuses it in text and jsonb alike."""
    return any("\x00" in text for text in _strings(value))


class SafeJSONParser(parsers.JSONParser):
    """DRF's JSON parser, with a body nested past what the parser can recurse (``RecursionError``) or past
    ``MAX_JSON_DEPTH`` answered as the client's 400 rather than a 500."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep.") from None
        if _depth(data) > MAX_JSON_DEPTH:
            raise exceptions.ParseError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep.")
        return data


def _json_type_error(field: serializers.Field[Any, Any, Any, Any], value: Any) -> str | None:
    """What is wrong with the JSON type of ``value`` for ``field``, or None. DRF coerces (``{"name": 0}`` becomes
    ``"0"``, ``1`` a boolean, an integer a UUID); the schema says string, boolean, integer: the API keeps to it."""
    if value is None:
        return None  # the field's own allow_null decides
    expected: tuple[type, ...] | None = None
    if isinstance(field, serializers.BooleanField):
        expected, name = (bool,), "a boolean"
    elif isinstance(field, serializers.IntegerField):
        if isinstance(value, bool):
            return "Must be an integer."
        expected, name = (int,), "an integer"
    elif isinstance(field, serializers.ChoiceField):
        choices = list(field.choices)
        if choices and all(isinstance(choice, str) for choice in choices):
            expected, name = (str,), "a string"
    elif isinstance(
        field,
        serializers.CharField
        | serializers.UUIDField
        | serializers.DateTimeField
        | serializers.DateField
        | serializers.EmailField,
    ):
        expected, name = (str,), "a string"
    elif isinstance(field, serializers.ListField):
        expected, name = (list,), "a list"
    elif isinstance(field, serializers.DictField):
        expected, name = (dict,), "an object"
    if expected is not None and not isinstance(value, expected):
        return f"Must be {name}."
    return None


class StrictInputSerializer(serializers.Serializer[Any]):
    """Input serializers refuse fields they do not declare as writable, values of another JSON type than the
    schema says, and NUL bytes anywhere (PostgreSQL cannot store them: a 400 on the field, never a 500).

    Mass assignment (``org``, ``id``, ``created_by``, ``digest``…) is refused with a 400 naming the field rather
    than silently dropped, so a client never believes it changed something it cannot change.
    """

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            writable = {name for name, field in self.fields.items() if not field.read_only}
            errors: dict[str, list[str]] = {
                str(key): ["This field cannot be set here."] for key in data if key not in writable
            }
            for name in writable & set(data):
                value = data[name]
                problem = _json_type_error(self.fields[name], value)
                if problem is None and has_nul(value):
                    problem = "Null characters are not allowed."
                if problem is not None:
                    errors[name] = [problem]
            if errors:
                raise serializers.ValidationError(dict(sorted(errors.items())))
        return super().to_internal_value(data)


class QuerySerializer(serializers.Serializer[Any]):
    """A query string's parameters. An optional parameter sent empty (``?status=``) is refused like any other
    invalid value (DRF's form handling would read it as absent and answer as if there were no filter), unless it
    has a default: then no value means the default (``?revoke_api_keys=``), and the schema says so
    (``allowEmptyValue``, ``cesaflow.lib.api_schema``)."""

    def to_internal_value(self, data: Any) -> Any:
        if hasattr(data, "getlist"):
            blank = {
                name: ["This field may not be blank."]
                for name, field in self.fields.items()
                if not field.read_only
                and data.get(name) == ""
                and field.default is serializers.empty
                and not getattr(field, "allow_blank", False)
            }
            if blank:
                raise serializers.ValidationError(blank)
        return super().to_internal_value(data)


def check_query_and_path(request: Request, kwargs: Mapping[str, Any]) -> None:
    """Every API operation's query string and path: each parameter at most once (none of ours is a list; DRF would
    silently read the last), and no NUL byte in a name or value (it would reach PostgreSQL). 400 otherwise."""
    params = request.query_params
    repeated = sorted(name for name in params if len(params.getlist(name)) > 1)
    if repeated:
        raise ApiError(
            status.HTTP_400_BAD_REQUEST,
            "validation_error",
            "The request is invalid.",
            {"fields": {name: ["Give this parameter once."] for name in repeated}},
        )
    nul = sorted(name for name, values in params.lists() if has_nul([name, *values]))
    nul += sorted(str(name) for name, value in kwargs.items() if has_nul(str(value)))
    if nul:
        raise ApiError(
            status.HTTP_400_BAD_REQUEST,
            "validation_error",
            "The request is invalid.",
            {"fields": {name.replace("\x00", "\\u0000"): ["Null characters are not allowed."] for name in nul}},
        )


# --- Pagination -------------------------------------------------------------------------------------


class CursorPagination(pagination.CursorPagination):
    """Newest first; ``id`` breaks ties between rows created in the same microsecond."""

    ordering = ("-created_at", "-id")
    page_size_query_param = "limit"
    max_page_size = 200

    def paginate_queryset(
        self, queryset: QuerySet[_M, _R], request: Request, view: APIView | None = None
    ) -> list[_R] | None:
        # A cursor is client input: a tampered one is a 400, not DRF's 404 nor a 500 from the position filter.
        try:
            return super().paginate_queryset(queryset, request, view)
        except (exceptions.NotFound, DjangoValidationError, ValueError):
            raise ApiError(status.HTTP_400_BAD_REQUEST, "invalid_cursor", "The cursor is invalid.") from None

    def get_page_size(self, request: Request) -> int | None:
        # DRF falls back to the default for ``limit=abc`` or ``limit=0``; the schema says 1 to max_page_size.
        raw = request.query_params.get(self.page_size_query_param or "limit")
        if raw is None:
            return self.page_size
        if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= self.max_page_size):
            raise ApiError(
                status.HTTP_400_BAD_REQUEST,
                "validation_error",
                "The request is invalid.",
                {"fields": {"limit": [f"A whole number from 1 to {self.max_page_size}."]}},
            )
        return int(raw)

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": self.max_page_size}
            elif parameter["name"] == self.cursor_query_param:
                parameter["description"] = (
                    "Opaque: the `next` or `previous` link of a page gives it. Anything else is a 400 `invalid_cursor`."
                )
        return parameters


# --- The schema and docs ----------------------------------------------------------------------------


class ApiDocsPermission(permissions.BasePermission):
    """The OpenAPI schema and docs: for anyone with ``CESAFLOW_API_DOCS_PUBLIC`` (development's default), else for
    a valid org API key or a signed-in dashboard session (``OrgAuthentication``, the one path; 401 otherwise)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        return bool(settings.API_DOCS_PUBLIC or (request.user and request.user.is_authenticated))
