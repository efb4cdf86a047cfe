"""The dialect adapters with the proxy's call options applied to the provider body (sampling, stop sequences,
tool choice), and a handle on the current attempt's parser."""

from __future__ import annotations

from typing import Any, ClassVar

import httpx

from keys.providers import ProviderName, provider_spec
from runs.providers.anthropic import AnthropicAdapter
from runs.providers.base import CallLimits, ChatRequest, ProviderAdapter, StreamParser
from runs.providers.openai import GroqAdapter, OpenAIAdapter, OpenAICompatibleAdapter
from runs.proxy.request import CallOptions


def apply_options(body: dict[str, Any], *, dialect: str, options: CallOptions) -> dict[str, Any]:
    """Add sampling, stop and tool-choice options to a provider request body, in the dialect's own terms."""
    has_tools = bool(body.get("tools"))
    if dialect == "anthropic":
        # The pinned anthropic-version (2023-06-01) accepts temperature and top_p.
        if options.temperature is not None:
            body["temperature"] = options.temperature
        if options.top_p is not None:
            body["top_p"] = options.top_p
        if options.stop:
            body["stop_sequences"] = list(options.stop)
        if has_tools:
            choice: dict[str, Any] | None = None
            if options.tool_choice == "none":
                choice = {"type": "none"}
            elif options.tool_choice == "required":
                choice = {"type": "any"}
            elif options.tool_choice == "function":
                choice = {"type": "tool", "name": options.tool_choice_name}
            elif options.tool_choice == "auto" or options.parallel_tool_calls is False:
                choice = {"type": "auto"}
            if choice is not None and options.parallel_tool_calls is False and choice["type"] != "none":
                choice["disable_parallel_tool_use"] = True
            if choice is not None:
                body["tool_choice"] = choice
        return body
    if options.temperature is not None:
        body["temperature"] = options.temperature
    if options.top_p is not None:
        body["top_p"] = options.top_p
    if options.stop:
        body["stop"] = list(options.stop)
    if has_tools:
        if options.tool_choice == "function":
            body["tool_choice"] = {"type": "function", "function": {"name": options.tool_choice_name}}
        elif options.tool_choice is not None:
            body["tool_choice"] = options.tool_choice
        if options.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = options.parallel_tool_calls
    return body


class ProxyAdapter(ProviderAdapter):
    """The dialect adapters, plus the proxy's call options and a handle on the current attempt's parser (what is
    known of usage when the client hangs up mid-stream)."""

    dialect: ClassVar[str] = "openai"
    options: CallOptions = CallOptions()
    current_parser: StreamParser | None = None

    def build_request(self, request: ChatRequest) -> tuple[str, dict[str, str], dict[str, Any]]:
        # The abstract method is implemented by the dialect class that follows this mixin in the MRO.
        url, headers, body = super().build_request(request)  # type: ignore[safe-super]
        return url, headers, apply_options(body, dialect=self.dialect, options=self.options)

    def new_parser(self) -> StreamParser:
        parser: StreamParser = super().new_parser()  # type: ignore[safe-super]
        self.current_parser = parser
        return parser


class ProxyOpenAIAdapter(ProxyAdapter, OpenAIAdapter):
    pass


class ProxyGroqAdapter(ProxyAdapter, GroqAdapter):
    pass


class ProxyOpenAICompatibleAdapter(ProxyAdapter, OpenAICompatibleAdapter):
    pass


class ProxyAnthropicAdapter(ProxyAdapter, AnthropicAdapter):
    dialect: ClassVar[str] = "anthropic"


_PROXY_ADAPTERS: dict[ProviderName, type[ProxyAdapter]] = {
    ProviderName.OPENAI: ProxyOpenAIAdapter,
    ProviderName.GROQ: ProxyGroqAdapter,
    ProviderName.OPENAI_COMPATIBLE: ProxyOpenAICompatibleAdapter,
    ProviderName.ANTHROPIC: ProxyAnthropicAdapter,
}


def proxy_adapter_for(
    provider: str,
    *,
    base_url: str | None,
    api_key: str,
    client: httpx.AsyncClient,
    options: CallOptions,
    limits: CallLimits | None = None,
) -> ProxyAdapter:
    """Like ``runs.providers.adapter_for``, with the proxy's options applied to the provider body."""
    spec = provider_spec(provider)
    adapter = _PROXY_ADAPTERS[spec.name](
        base_url=spec.base_url(base_url), api_key=api_key, client=client, limits=limits
    )
    adapter.options = options
    return adapter
