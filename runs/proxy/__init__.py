"""The OpenAI-compatible proxy's translation layer: pure functions and small state machines, no I/O.

* ``request``: OpenAI Chat Completions request JSON -> the adapters' neutral ``ChatRequest`` (plus the sampling
  and tool-choice options the neutral request does not carry), with validation that answers OpenAI-shaped 400s;
* ``adapters``: the dialect adapters with those options applied to the provider body;
* ``response``: the adapters' neutral events -> ``chat.completion.chunk`` SSE frames, or one ``chat.completion``;
* ``errors``: ``ProviderError`` -> the HTTP status, error body and headers that make the stock ``openai`` SDK raise
  the matching exception class (``AuthenticationError``, ``RateLimitError``, ``InternalServerError``, ...).

The HTTP side (authentication, the run record, the key opening, streaming) is ``runs.api.proxy_views``.

Nothing here logs, and no repr shows conversation text: request and response content is customer data that passes
through memory only.

Request fields honoured: ``model`` (``<provider key label>/<model>``, split at the first ``/``), ``messages``
(system/developer, user, assistant with ``tool_calls``, tool; text content as a string or text parts),
``tools``, ``tool_choice``, ``parallel_tool_calls``, ``max_completion_tokens`` / ``max_tokens``, ``stream``,
``stream_options.include_usage``, ``temperature``, ``top_p``, ``stop``. ``n`` must be 1. Everything else
(``response_format``, ``seed``, ``logprobs``, ``user``, ``metadata``, ...) is accepted and ignored.
"""

from runs.proxy.adapters import ProxyAdapter, apply_options, proxy_adapter_for
from runs.proxy.errors import ERROR_SUMMARIES, ProxyError, database_unavailable, error_for_provider
from runs.proxy.request import (
    CallOptions,
    CompletionRequest,
    max_body_bytes,
    parse_completion_request,
    parse_json_body,
    split_model,
)
from runs.proxy.response import DONE_FRAME, CompletionTranslator, UsageTotals, sse, stream_error_frame

__all__ = [
    "DONE_FRAME",
    "ERROR_SUMMARIES",
    "CallOptions",
    "CompletionRequest",
    "CompletionTranslator",
    "ProxyAdapter",
    "ProxyError",
    "UsageTotals",
    "apply_options",
    "database_unavailable",
    "error_for_provider",
    "max_body_bytes",
    "parse_completion_request",
    "parse_json_body",
    "proxy_adapter_for",
    "split_model",
    "sse",
    "stream_error_frame",
]
