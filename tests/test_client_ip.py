"""The client IP recorded in the audit trail and used by login rate limits."""

from django.test import RequestFactory

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
