"""The logging redaction filter, the second line of defence (security.md §9 test 50): credential-shaped strings
sent through the root logger at DEBUG, httpx/httpcore loggers included, come out of the project's configured
handler redacted."""

from __future__ import annotations

import logging

import pytest

from cesaflow.lib.redact import REDACTED, RedactingFilter, redact
from tests.keys.canary import debug_logging

SAMPLES = {
    "openai": "sk-" + "A1b2C3d4E5f6G7h8I9j0K1l2",
    "openai_project": "sk-proj-" + "Zx9_Yw8-Vu7Ts6Rq5Po4Nm3Lk2",
    "anthropic": "sk-ant-api03-" + "Qq1Ww2Ee3Rr4Tt5Yy6Uu7Ii8-Oo9Pp0",
    "groq": "gsk_" + "Mm1Nn2Bb3Vv4Cc5Xx6Zz7Ll8Kk9",
    "cesaflow": "cf_live_" + "AbCdEfGhIjKl_" + "m" * 49,
    "jwt": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    + "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "opaque": "opaque-gateway-token-7f3a9c21",
}


def _configured_handler_output(emit) -> str:
    with debug_logging() as capture:
        assert capture.configured, "the project's stream handler with the redaction filter is installed"
        assert any(isinstance(f, RedactingFilter) for h, _ in capture.configured for f in h.filters)
        emit()
    return "".join(buffer.getvalue() for buffer in capture.buffers)


@pytest.mark.parametrize("logger_name", ["", "cesaflow", "keys.services", "httpx", "httpcore.http11", "httpcore"])
def test_credentials_are_redacted_from_every_logger_at_debug(logger_name):
    logger = logging.getLogger(logger_name)

    def emit() -> None:
        logger.debug("openai %s project %s", SAMPLES["openai"], SAMPLES["openai_project"])
        logger.debug("anthropic=%s groq=%s", SAMPLES["anthropic"], SAMPLES["groq"])
        logger.info("api key %s token %s", SAMPLES["cesaflow"], SAMPLES["jwt"])
        logger.debug("headers: Authorization: Bearer %s", SAMPLES["opaque"])
        logger.debug("headers: {'x-api-key': '%s'}", SAMPLES["opaque"])
        logger.debug("send_request_headers.started request=%s", [(b"x-api-key", SAMPLES["opaque"].encode())])
        logger.debug("raw headers %s", [(b"authorization", b"Bearer " + SAMPLES["opaque"].encode())])
        logger.debug("x-api-key: %s", SAMPLES["opaque"])

    output = _configured_handler_output(emit)
    for name, value in SAMPLES.items():
        assert value not in output, name
    assert output.count(REDACTED) >= 10
    assert "openai" in output  # the message around the secret survives
    assert "send_request_headers.started" in output


def test_exception_text_and_tracebacks_are_redacted():
    secret = SAMPLES["anthropic"]

    def emit() -> None:
        try:
            raise ValueError(f"provider said: invalid key {secret}")
        except ValueError:
            logging.getLogger("keys.services").exception("call failed for %s", SAMPLES["groq"])

    output = _configured_handler_output(emit)
    assert secret not in output
    assert SAMPLES["groq"] not in output
    assert "ValueError: provider said: invalid key" in output


def test_redact_keeps_ordinary_text():
    text = "the task-runner asked for sk- prefixed keys; x-api-key header missing; bearer tokens expire"
    assert redact(text) == text


@pytest.mark.parametrize("value", list(SAMPLES.values())[:-1])
def test_each_provider_key_shape_is_recognised_on_its_own(value):
    assert value not in redact(f"value={value}")
    assert value not in redact(f'{{"key": "{value}"}}')
