"""The client IP recorded in the audit trail and used by login rate limits."""

import logging

import pytest
from django.test import RequestFactory
from django.urls import reverse

from cesaflow.lib import middleware
from cesaflow.lib.middleware import client_ip


def test_remote_addr_is_the_client_ip_unless_a_proxy_is_trusted(settings):
    settings.TRUST_X_FORWARDED_FOR = False
    request = RequestFactory().get("/", REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR="198.51.100.7")
    assert client_ip(request) == "10.0.0.5"


def test_behind_a_trusted_proxy_the_address_it_appended_counts_not_what_the_client_sent(settings):
    settings.TRUST_X_FORWARDED_FOR = True
    # The client sent a forged first hop; nginx appended the address it really saw.
    request = RequestFactory().get("/", REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR="1.2.3.4, 198.51.100.7")
    assert client_ip(request) == "198.51.100.7"


@pytest.fixture
def fresh_process(monkeypatch):
    """As if this process had not yet said anything about forwarded headers."""
    monkeypatch.setattr(middleware, "_untrusted_forwarding_logged", False)


def test_forwarded_requests_while_forwarding_is_untrusted_are_logged_once_per_process(
    settings, client, caplog, fresh_process
):
    settings.TRUST_X_FORWARDED_FOR = False
    with caplog.at_level(logging.WARNING, logger="cesaflow.security"):
        client.get("/healthz")  # no header: nothing to say
        assert not caplog.records
        for _ in range(3):
            response = client.get(reverse("orgs:login"), HTTP_X_FORWARDED_FOR="203.0.113.9")
            assert response.status_code == 200
    warnings = [r for r in caplog.records if "CESAFLOW_TRUST_X_FORWARDED_FOR is off" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "203.0.113.9" not in caplog.text  # the client-controlled value is not logged


def test_forwarded_requests_behind_a_trusted_proxy_say_nothing(settings, client, caplog, fresh_process):
    settings.TRUST_X_FORWARDED_FOR = True
    with caplog.at_level(logging.WARNING, logger="cesaflow.security"):
        client.get(reverse("orgs:login"), HTTP_X_FORWARDED_FOR="203.0.113.9")
    assert not caplog.records
