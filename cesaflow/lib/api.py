"""API conventions shared by every app: one error shape, strict input serializers, cursor pagination."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Model, QuerySet
from django.http import Http404
from rest_framework import exceptions, pagination, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

if TYPE_CHECKING:
    # Only for annotations: importing DRF's views here at runtime would import the authentication classes
    # (which import this module for pagination) in the middle of their own import.
    from rest_framework.views import APIView

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


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Every API error is ``{"error": {"code", "message", "details"}}`` with the right status."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, DjangoValidationError):
        # A service refused the input: that is the client's 400, never a 500.
        exc = validation_error_from_django(exc)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # unexpected: Django's handler500 answers (JSON for /api/, see cesaflow.views)
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


class StrictInputSerializer(serializers.Serializer[Any]):
    """Input serializers refuse fields they do not declare as writable.

    Mass assignment (``org``, ``id``, ``created_by``, ``digest``…) is refused with a 400 naming the field rather
    than silently dropped, so a client never believes it changed something it cannot change.
    """

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            writable = {name for name, field in self.fields.items() if not field.read_only}
            unknown = sorted(str(key) for key in data if key not in writable)
            if unknown:
                raise serializers.ValidationError({key: ["This field cannot be set here."] for key in unknown})
        return super().to_internal_value(data)


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
