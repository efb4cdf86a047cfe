"""The provider catalog and the key check (providers.md §1.7). Pure: no ORM, no settings.

The caller passes the HTTP client (``cesaflow.lib.http.get_http_client(policy)``), so the egress policy that guards
the check is the caller's. The secret is used for one request and never logged, stored or echoed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import httpx

from cesaflow.lib.http import EgressDenied
from cesaflow.lib.redact import redact
from keys.urlguard import NOT_ALLOWED_MESSAGE, UrlRejected, normalize_base_url

logger = logging.getLogger(__name__)

ANTHROPIC_VERSION = "2023-06-01"  # pinned: documented, widely accepted, allows sampling parameters (§1.4)
PROBE_TIMEOUT = httpx.Timeout(connect=5.0, read=10.0, write=10.0, pool=10.0)
PROBE_MAX_BYTES = 2 * 1024 * 1024  # model lists are small; anything bigger is not a model list
MAX_MODELS = 1000


class ProviderName(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GROQ = "groq"
    OPENAI_COMPATIBLE = "openai_compatible"


@dataclass(frozen=True)
class ProviderSpec:
    name: ProviderName
    label: str
    dialect: Literal["openai", "anthropic"]
    default_base_url: str | None  # None: the user must give one (openai_compatible)
    models_path: str  # appended to the base URL

    def auth_headers(self, secret: str) -> dict[str, str]:
        if self.dialect == "anthropic":
            return {"x-api-key": secret, "anthropic-version": ANTHROPIC_VERSION}
        return {"authorization": f"Bearer {secret}"}

    def base_url(self, override: str | None = None) -> str:
        """The base URL to call, without a trailing slash. Raises ValueError when none is known."""
        url = (override or self.default_base_url or "").strip()
        if not url:
            raise ValueError(f"A base URL is required for {self.label}.")
        return url.rstrip("/")


# A key with an empty base_url is bound (AAD) to its provider's default_base_url: changing one of these URLs needs a
# migration that re-seals those keys, or they no longer open.
PROVIDERS: dict[ProviderName, ProviderSpec] = {
    ProviderName.OPENAI: ProviderSpec(ProviderName.OPENAI, "OpenAI", "openai", "https://api.openai.com/v1", "/models"),
    ProviderName.ANTHROPIC: ProviderSpec(
        ProviderName.ANTHROPIC, "Anthropic", "anthropic", "https://api.anthropic.com", "/v1/models"
    ),
    ProviderName.GROQ: ProviderSpec(ProviderName.GROQ, "Groq", "openai", "https://api.groq.com/openai/v1", "/models"),
    ProviderName.OPENAI_COMPATIBLE: ProviderSpec(
        ProviderName.OPENAI_COMPATIBLE, "OpenAI-compatible", "openai", None, "/models"
    ),
}


def provider_spec(provider: str | ProviderName) -> ProviderSpec:
    """The catalog entry; ValueError for an unknown provider name."""
    return PROVIDERS[ProviderName(provider)]


# Never the output of normalize_base_url (which always starts with a scheme), so it cannot match a sealed key.
_UNUSABLE_DESTINATION = "unusable:"


def provider_destination(provider: str | ProviderName, base_url: str | None) -> str:
    """Where calls with a key of ``provider`` and this stored ``base_url`` go, in the one normalized form
    (``keys.urlguard.normalize_base_url``); empty means the provider's default endpoint, normalized the same way.

    A provider key's ciphertext is bound to this value (AAD), so a key whose destination changed does not open.
    A stored value that is not a usable URL (only a row written outside the application holds one) maps to a
    text no usable URL normalizes to: it never matches. ValueError for an unknown provider.
    """
    spec = provider_spec(provider)
    url = (base_url or "").strip() or spec.default_base_url or ""
    try:
        return normalize_base_url(url)
    except UrlRejected:
        return _UNUSABLE_DESTINATION + url


class ProbeStatus(StrEnum):
    VALID = "valid"
    RESTRICTED = "restricted"  # the key works but may not list models (a scoped OpenAI project key)
    INVALID = "invalid"
    UNREACHABLE = "unreachable"  # we could not tell: network failure or provider error; keep the previous status


@dataclass(frozen=True)
class ProbeResult:
    status: ProbeStatus
    models: tuple[str, ...] = ()
    message: str = ""
    http_status: int | None = None


def _scrub(text: str, secret: str) -> str:
    if secret and len(secret) >= 4:
        text = text.replace(secret, "[redacted]")
    text = redact(text)
    return text[:300]


def _error_message(body: Any) -> str:
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return ""


def _is_quota_error(body: Any) -> bool:
    error = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(error, Mapping):
        return False
    details = error.get("details")
    codes = {error.get("code"), error.get("type"), details.get("error_code") if isinstance(details, Mapping) else None}
    return bool(codes & {"insufficient_quota", "enforced_spend_limit_reached", "billing_error"})


def _is_scope_message(message: str) -> bool:
    lowered = message.lower()
    return "missing scopes" in lowered or "insufficient permissions" in lowered


async def _read_capped(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > PROBE_MAX_BYTES:
            raise ValueError("response too large")
        chunks.append(chunk)
    return b"".join(chunks)


async def probe_models(
    provider: str | ProviderName, base_url: str | None, secret: str, client: httpx.AsyncClient
) -> ProbeResult:
    """Check a key with the provider's model-list call (no tokens billed) and classify the answer."""
    spec = provider_spec(provider)
    try:
        url = spec.base_url(base_url) + spec.models_path
    except ValueError as exc:
        return ProbeResult(ProbeStatus.UNREACHABLE, message=str(exc))
    params = {"limit": str(MAX_MODELS)} if spec.dialect == "anthropic" else None
    try:
        async with client.stream(
            "GET", url, params=params, headers=spec.auth_headers(secret), timeout=PROBE_TIMEOUT
        ) as response:
            raw = await _read_capped(response)
            status = response.status_code
    except EgressDenied as exc:
        # The refusal names the host and what it resolved to: the operator's log gets it, the user the generic words.
        logger.warning("key check to %s refused by the egress policy: %s", spec.label, exc)
        return ProbeResult(ProbeStatus.UNREACHABLE, message=NOT_ALLOWED_MESSAGE)
    except httpx.HTTPError as exc:
        return ProbeResult(ProbeStatus.UNREACHABLE, message=f"Could not reach {spec.label} ({type(exc).__name__}).")
    except ValueError:
        return ProbeResult(ProbeStatus.UNREACHABLE, message="The model list response was too large.")
    try:
        body: Any = json.loads(raw) if raw else None
    except ValueError:
        body = None
    message = _scrub(_error_message(body), secret)

    if 200 <= status < 300:
        data = body.get("data") if isinstance(body, Mapping) else None
        if not isinstance(data, list):
            return ProbeResult(ProbeStatus.UNREACHABLE, message="The answer is not a model list.", http_status=status)
        models = tuple(sorted({str(item["id"])[:200] for item in data if isinstance(item, Mapping) and item.get("id")}))
        return ProbeResult(ProbeStatus.VALID, models=models[:MAX_MODELS], http_status=status)
    if status in (401, 403) and _is_scope_message(message):
        return ProbeResult(ProbeStatus.RESTRICTED, message=message or "The key cannot list models.", http_status=status)
    if status == 401:
        return ProbeResult(ProbeStatus.INVALID, message=message or "The provider rejected the key.", http_status=status)
    if status == 403:
        return ProbeResult(
            ProbeStatus.RESTRICTED, message=message or "The key may not list models.", http_status=status
        )
    if status in (402, 429) and _is_quota_error(body):
        # Valid key, but out of credit: accept it and say why calls will fail.
        return ProbeResult(ProbeStatus.VALID, message=message or "The key has no remaining quota.", http_status=status)
    return ProbeResult(
        ProbeStatus.UNREACHABLE,
        message=message or f"{spec.label} answered HTTP {status}.",
        http_status=status,
    )
