"""The egress policy from settings, and its agreement with the base-URL guard: what ``keys.urlguard`` accepts when a
URL is saved is exactly what ``cesaflow.lib.http`` lets a connection reach (loopback in development only; private
ranges, link-local and metadata addresses never, unless allow-listed)."""

from __future__ import annotations

import ipaddress

import pytest

from keys import urlguard
from keys.egress import egress_policy

ADDRESSES = [
    "127.0.0.1",
    "127.8.9.10",
    "::1",
    "10.0.0.9",
    "172.16.0.1",
    "192.168.1.20",
    "169.254.169.254",
    "100.100.100.200",
    "fd00:ec2::254",
    "fe80::1",
    "0.0.0.0",  # noqa: S104 - an address under test, not a bind
    "::ffff:10.0.0.1",
    "::ffff:127.0.0.1",
    "8.8.8.8",
    "2606:4700:4700::1111",
]


@pytest.mark.parametrize("production", [False, True])
@pytest.mark.parametrize("address", ADDRESSES)
def test_connect_time_policy_agrees_with_the_save_time_guard(settings, production, address):
    settings.PRODUCTION = production
    settings.PROVIDER_HOST_ALLOWLIST = []
    ip = ipaddress.ip_address(address)
    saved_ok = urlguard.address_refusal(ip, allow_loopback=not production) is None
    assert egress_policy().address_allowed(ip) is saved_ok


def test_development_allows_loopback_but_not_private_networks(settings):
    settings.PRODUCTION = False
    settings.PROVIDER_HOST_ALLOWLIST = []
    policy = egress_policy()
    assert policy.address_allowed(ipaddress.ip_address("127.0.0.1"))
    assert not policy.address_allowed(ipaddress.ip_address("192.168.1.20"))
    assert not policy.address_allowed(ipaddress.ip_address("169.254.169.254"))
    assert not policy.allow_private


def test_production_refuses_loopback_unless_the_operator_allows_it(settings):
    settings.PRODUCTION = True
    settings.PROVIDER_HOST_ALLOWLIST = []
    assert not egress_policy().address_allowed(ipaddress.ip_address("127.0.0.1"))
    settings.PROVIDER_HOST_ALLOWLIST = ["10.1.0.0/16", "vllm.internal:8000"]
    policy = egress_policy()
    assert policy.address_allowed(ipaddress.ip_address("10.1.2.3"))
    assert not policy.address_allowed(ipaddress.ip_address("10.2.0.1"))
    assert policy.host_allowlisted("vllm.internal", 8000)
    assert not policy.host_allowlisted("vllm.internal", 9000)


def test_the_policy_is_built_at_call_time_and_equal_policies_share_a_client(settings):
    settings.PRODUCTION = False
    first = egress_policy()
    assert egress_policy() == first  # get_http_client keys its pool by policy: one client per loop
    settings.PRODUCTION = True
    assert egress_policy() != first
