"""Schemathesis hooks for the API fuzzer (``st run`` loads this file; see ``tests/fuzz/test_schemathesis.py``).

* Path parameters are drawn from the fuzzer's own values, org A's objects (to reach the code behind the lookup)
  and org B's (which must answer 404 like a missing id).
* Safety: every ``base_url`` the fuzzer sends is the provider simulator's (no DNS, no egress), and org A's API key,
  its Admin's membership, the simulator key and the project the fuzzer reads through are never deleted or demoted
  (the fuzzer would lock itself out and test nothing more).
* Check ``no_cross_org_read``: no response to org A ever contains an id of org B or org B's marker, and an id of
  org B in the path is a 404.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import strategies as st

WORLD: dict[str, Any] = json.loads(Path(os.environ["CESAFLOW_FUZZ_WORLD"]).read_text())
FOREIGN_IDS: frozenset[str] = frozenset(WORLD["foreign_ids"])
MARKER: str = WORLD["marker"]
# Statuses an org B id may meet before its lookup: the request is refused as a whole, saying nothing of the object.
BEFORE_LOOKUP = {401, 405, 406, 413, 415, 429}
BODY_IDS = {"provider_key": "key_id", "default_provider_key": "key_id", "project": "project_id"}


def _choices(name: str) -> list[str]:
    return [*WORLD["own"].get(name, []), *WORLD["foreign"].get(name, [])]


@schemathesis.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    if not path_parameters:
        return st.just(path_parameters)
    options: dict[str, Any] = {}
    for name, value in path_parameters.items():
        known = _choices(name)
        options[name] = st.sampled_from([value, *known]) if known else st.just(value)
    return st.fixed_dictionaries(options)


@schemathesis.hook
def flatmap_body(context: Any, body: Any) -> Any:
    if not isinstance(body, dict):
        return st.just(body)
    options: dict[str, Any] = {}
    for name, value in body.items():
        known = _choices(BODY_IDS[name]) if name in BODY_IDS else []
        options[name] = st.sampled_from([value, *known]) if known else st.just(value)
    return st.fixed_dictionaries(options)


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Applies to every phase: keeps the fuzzer on loopback and able to go on."""
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("base_url"), str) and "://" in body["base_url"]:
        body["base_url"] = WORLD["simulator_url"]
    method = case.method.upper()
    for name, value in list((case.path_parameters or {}).items()):
        if method in {"DELETE", "PATCH"} and str(value) == WORLD["protected"].get(name):
            case.path_parameters[name] = str(uuid.uuid4())


def _path_ids(case: Any) -> set[str]:
    return {str(value).lower() for value in (case.path_parameters or {}).values()}


@schemathesis.check
def no_cross_org_read(ctx: Any, response: Any, case: Any) -> bool | None:
    foreign = _path_ids(case) & FOREIGN_IDS
    code, fields = _error(response)
    refused_whole = response.status_code == 400 and code == "validation_error" and fields <= set(case.query or {})
    # The query string refused as a whole (a repeated parameter) comes before any lookup, like the statuses here.
    if foreign and response.status_code not in {404, *BEFORE_LOOKUP} and not (fields and refused_whole):
        raise AssertionError(f"Org B's id {sorted(foreign)[0]} answered {response.status_code}, not 404.")
    text = response.content.decode("utf-8", errors="replace").lower()
    if MARKER in text:
        raise AssertionError("A response to org A names an object of org B (its marker).")
    leaked = sorted(identifier for identifier in FOREIGN_IDS if identifier in text)
    if leaked:
        raise AssertionError(f"A response to org A carries ids of org B: {', '.join(leaked)}")
    return None


# Schema-valid input that a JSON schema cannot express as invalid, refused with a 400 each operation documents:
# (operation, error code, the fields it may name). A 400 naming anything else is a disagreement between the schema
# and the validators, and stays a failure.
SEMANTIC_400: dict[str, dict[str, set[str]]] = {
    "*": {"invalid_cursor": set()},  # a cursor is opaque: only the server's own links are valid
    "GET /api/v1/audit-events": {"validation_error": {"until"}},  # later than since
    "GET /api/v1/usage": {"validation_error": {"since", "until"}},  # a period of at most 366 days, in order
    "POST /api/v1/api-keys": {"validation_error": {"scopes", "expires_at"}},  # your own scopes; a future expiry
    "POST /api/v1/provider-keys": {"validation_error": {"label", "base_url", "secret"}},  # taken; refused; shape
    "POST /api/v1/projects": {"validation_error": {"default_provider_key", "name", "default_model"}},
    "PATCH /api/v1/projects/{project_id}": {"validation_error": {"default_provider_key", "name", "default_model"}},
    "POST /api/v1/runs": {
        "validation_error": {"provider_key", "model", "project", "limits", "cancel_on_disconnect", "objective"}
    },
    "GET /api/v1/projects/{project_id}/files/{path}": {"invalid_path": set()},  # confined, text, size
}


UNDECLARED = "This field cannot be set here."  # StrictInputSerializer: a property the schema does not declare


def _error_fields(response: Any) -> tuple[str, dict[str, Any]]:
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return "", {}
    return str(error.get("code", "")), dict((error.get("details") or {}).get("fields") or {})


def _error(response: Any) -> tuple[str, set[str]]:
    code, fields = _error_fields(response)
    return code, set(fields)


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    if getattr(failure, "code", None) != "ST202" or response.status_code != 400:
        return True
    code, messages = _error_fields(response)
    label = f"{case.method.upper()} {case.operation.path}"
    allowed = {"validation_error": set(), **SEMANTIC_400["*"], **SEMANTIC_400.get(label, {})}
    if code not in allowed:
        return True
    # Each field named must be one the operation documents a semantic refusal for, or one the schema does not
    # declare (additionalProperties: false; schemathesis sometimes adds properties it saw in responses, like
    # ``error``, and still calls the body valid).
    documented = all(name in allowed[code] or messages[name] == [UNDECLARED] for name in messages)
    return not (documented and (messages or code != "validation_error"))
