"""The floor's three endpoints. Deliberately minimal: each line is something any proxy must do."""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import AsyncIterator

import httpx
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, StreamingHttpResponse

from bench.floor import settings

# The provider key is sealed at start-up with a throwaway AES-256 key and opened for every call, as a vault
# would: the floor pays for the decryption CesaFlow pays for.
_AAD = b"bench-floor/provider-key"
_VAULT_KEY = AESGCM.generate_key(bit_length=256)
_NONCE = os.urandom(12)
_SEALED = AESGCM(_VAULT_KEY).encrypt(_NONCE, b"fake-floor-provider-key", _AAD)

_client: httpx.AsyncClient | None = None


def _http() -> httpx.AsyncClient:
    # One client per process (both servers run one event loop), sized like CesaFlow's for thousands of streams.
    global _client
    if _client is None:
        _client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=8192, max_keepalive_connections=1024, keepalive_expiry=60.0),
            timeout=httpx.Timeout(connect=10.0, read=120.0, write=30.0, pool=30.0),
        )
    return _client


def _authorized(request: HttpRequest) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), settings.FLOOR_TOKEN.encode())


def _error(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": {"message": message, "type": "invalid_request_error"}}, status=status)


async def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok", content_type="text/plain")


async def org(request: HttpRequest) -> HttpResponse:
    """A trivial authenticated JSON endpoint: the floor of a plain API request."""
    if not _authorized(request):
        return _error(401, "Invalid API key.")
    return JsonResponse({"id": "00000000-0000-0000-0000-000000000001", "slug": "floor", "name": "Floor"})


async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    if request.method != "POST":
        return _error(405, "Method not allowed.")
    if not _authorized(request):
        return _error(401, "Invalid API key.")
    try:
        body = json.loads(request.body)
        label, _, model = body["model"].partition("/")
        base_url = settings.FLOOR_UPSTREAMS[label]
    except (ValueError, KeyError, AttributeError, TypeError):
        return _error(400, "Bad request or unknown model.")
    body["model"] = model
    provider_key = AESGCM(_VAULT_KEY).decrypt(_NONCE, _SEALED, _AAD).decode()
    client = _http()
    upstream = await client.send(
        client.build_request(
            "POST",
            f"{base_url}/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {provider_key}"},
        ),
        stream=True,
    )
    if upstream.status_code != 200:
        content = await upstream.aread()
        await upstream.aclose()
        return HttpResponse(content, status=upstream.status_code, content_type="application/json")

    async def relay() -> AsyncIterator[bytes]:
        # Cancelling this generator (client gone) leaves the block and closes the upstream connection.
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:
            await upstream.aclose()

    response = StreamingHttpResponse(relay(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    return response
