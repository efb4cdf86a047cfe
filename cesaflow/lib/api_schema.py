"""The REST API's OpenAPI schema class: the errors every operation can answer, and event streams' events.

Apart from ``cesaflow.lib.api`` because drf-spectacular's AutoSchema imports DRF's generic views, which load the
pagination class from that module: importing it there would be circular.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import force_instance
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter

from cesaflow.lib.api import ErrorSerializer, StrictInputSerializer

# What any operation can answer besides its own outcomes, in the one error shape: 400 (a repeated query parameter,
# a NUL byte, a malformed body), 401, 403 (role, scope, suspended org), 404 (a session user in no organization;
# an object that is not the caller's org's), 406 (an Accept header we cannot satisfy), 413 (the body limit,
# cesaflow.lib.body_limit), 429 (rate limits, with Retry-After). 415 joins for operations that take a body.
COMMON_ERROR_STATUSES = (400, 401, 403, 404, 406, 413, 429)
BODY_ERROR_STATUSES = (415,)

RETRY_AFTER = OpenApiParameter(
    "Retry-After",
    OpenApiTypes.INT,
    location=OpenApiParameter.HEADER,
    response=[429],
    required=True,
    description="Seconds to wait before trying again.",
)

# One Server-Sent Event as a client parses it: ``data`` is the event's JSON (runs.events), ``event`` its type.
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "id": {"type": "string"},
        "data": {"type": "string", "description": "The event as JSON: `type`, `run_id`, `seq` and its fields."},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}


# Strings the API takes never hold a NUL byte (PostgreSQL cannot store one; cesaflow.lib.api refuses it with a 400).
NO_NUL_PATTERN = "^[^\\u0000]*$"


def _forbid_nul(schema: dict[str, Any]) -> None:
    if schema.get("type") == "string" and not {"enum", "pattern", "format"} & set(schema):
        schema["pattern"] = NO_NUL_PATTERN


class ApiAutoSchema(AutoSchema):
    """The REST API's schema: every operation documents the errors it can answer (``COMMON_ERROR_STATUSES``) and
    the ``Retry-After`` header of a 429, and event streams describe their events, so the schema and what the
    server does agree (schemathesis checks it: ``tests/fuzz``)."""

    def _get_format_parameters(self) -> list[Any]:
        # DRF's ``?format=`` override is not part of the API: ``Accept`` (or ``stream: true``) chooses a stream.
        return []

    def _get_parameters(self) -> list[dict[str, Any]]:
        parameters: list[dict[str, Any]] = super()._get_parameters()
        for parameter in parameters:
            _forbid_nul(parameter.get("schema", {}))
            if parameter["in"] == "query" and "default" in parameter.get("schema", {}):
                parameter["allowEmptyValue"] = True  # no value means the default (cesaflow.lib.api.QuerySerializer)
        return parameters

    def _map_basic_serializer(self, serializer: Any, direction: Any) -> dict[str, Any]:
        # drf-spectacular's own methods are untyped; their contracts are the ones overridden here.
        schema: dict[str, Any] = super()._map_basic_serializer(serializer, direction)  # type: ignore[no-untyped-call]
        instance = force_instance(serializer)  # type: ignore[no-untyped-call]
        if direction == "request":
            for field_schema in schema.get("properties", {}).values():
                _forbid_nul(field_schema)
        if direction == "request" and isinstance(instance, StrictInputSerializer):
            schema["additionalProperties"] = False  # refused with a 400 naming the field (StrictInputSerializer)
        return schema

    def _get_request_for_media_type(self, serializer: Any, direction: Any = "request") -> Any:
        # Our PATCH views validate their input serializer as declared (optional fields say required=False), never
        # with DRF's partial=True: the schema says what they check, not spectacular's all-optional "Patched…".
        method = self.method
        self.method = "PUT" if method == "PATCH" else method
        try:
            return super()._get_request_for_media_type(serializer, direction)  # type: ignore[no-untyped-call]
        finally:
            self.method = method

    def get_override_parameters(self) -> list[Any]:
        return [*super().get_override_parameters(), RETRY_AFTER]

    def _get_response_bodies(self, direction: Any = "response") -> dict[str, Any]:
        responses: dict[str, Any] = super()._get_response_bodies(direction)
        statuses = list(COMMON_ERROR_STATUSES)
        if self.method in {"POST", "PUT", "PATCH"}:
            statuses += BODY_ERROR_STATUSES
        for status in statuses:
            if str(status) not in responses:
                responses[str(status)] = self._get_response_for_code(  # type: ignore[no-untyped-call]
                    ErrorSerializer, str(status), direction=direction
                )
        for code, response in responses.items():
            content = response.get("content", {})
            if int(code) >= 400:
                # Errors are JSON whatever the operation's success answers with (a stream, a zip, a text file).
                for media_type in [name for name in content if name != "application/json"]:
                    del content[media_type]
            elif "text/event-stream" in content:
                content["text/event-stream"]["schema"] = dict(SSE_EVENT_SCHEMA)
        return dict(sorted(responses.items()))
