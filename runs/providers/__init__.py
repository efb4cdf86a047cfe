"""Provider adapters: one streaming call to OpenAI, Anthropic, Groq or an OpenAI-compatible server, as
provider-neutral events (``runs.providers.events``)."""

from __future__ import annotations

import httpx

from keys.providers import ProviderName, provider_spec
from runs.providers.anthropic import AnthropicAdapter
from runs.providers.base import CallLimits, ChatRequest, Message, ProviderAdapter, ToolCall, ToolSpec, read_to_end
from runs.providers.openai import GroqAdapter, OpenAIAdapter, OpenAICompatibleAdapter

ADAPTERS: dict[ProviderName, type[ProviderAdapter]] = {
    ProviderName.OPENAI: OpenAIAdapter,
    ProviderName.ANTHROPIC: AnthropicAdapter,
    ProviderName.GROQ: GroqAdapter,
    ProviderName.OPENAI_COMPATIBLE: OpenAICompatibleAdapter,
}


def adapter_for(
    provider: str,
    *,
    base_url: str | None,
    api_key: str,
    client: httpx.AsyncClient,
    limits: CallLimits | None = None,
) -> ProviderAdapter:
    """The adapter for one call. ``base_url`` None means the provider's official URL (required for
    openai_compatible). ValueError for an unknown provider or a missing base URL."""
    spec = provider_spec(provider)
    return ADAPTERS[spec.name](base_url=spec.base_url(base_url), api_key=api_key, client=client, limits=limits)


__all__ = [
    "ADAPTERS",
    "CallLimits",
    "ChatRequest",
    "Message",
    "ProviderAdapter",
    "ToolCall",
    "ToolSpec",
    "adapter_for",
    "read_to_end",
]
