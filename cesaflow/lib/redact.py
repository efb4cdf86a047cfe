"""A logging filter that scrubs credential-shaped strings: the second line of defence, never the first."""

from __future__ import annotations

import logging
import re

_PATTERNS = [
    # CesaFlow org API keys.
    re.compile(r"cf_(?:live|test)_[A-Za-z0-9_]{8,}"),
    # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-), Groq (gsk_) keys.
    # (Not preceded by a letter or digit, so "api_key_sk-…" is caught and "task-…" is not.)
    re.compile(r"(?<![A-Za-z0-9])(?:sk-ant-|sk-proj-|sk-|gsk_)[A-Za-z0-9_\-]{8,}"),
    # Header forms, whatever the key looks like.
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=\-]{8,}"),
    # "x-api-key: v", "'x-api-key': 'v'", "x-api-key=v" and httpcore's "(b'x-api-key', b'v')"; also "api-key".
    re.compile(r"(?i)((?:x-)?api-key['\"]?\s*[:=,]\s*(?:b?['\"])?)[^\s'\",})]{4,}"),
    # Any Authorization header value (Basic, Token, ...), whatever its scheme.
    re.compile(r"(?i)(\bauthorization['\"]?\s*[:=,]\s*(?:b?['\"])?)[^'\",})\r\n]{4,}"),
    # JWTs.
    re.compile(r"\beyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]+"),
]
REDACTED = "[redacted]"


def redact(text: str) -> str:
    for pattern in _PATTERNS:
        # Patterns with a group keep their prefix (e.g. "Bearer ") and lose the credential.
        text = pattern.sub(r"\g<1>" + REDACTED if pattern.groups else REDACTED, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record's fully formatted message (and exception text) with secrets removed."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not break logging
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_info:
            # Format the traceback now so the redacted text, not the raw one, is what handlers print.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
