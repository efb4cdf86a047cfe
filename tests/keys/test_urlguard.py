"""keys.urlguard: custom base URLs cannot aim provider calls at internal services (SSRF), in production or in
development, unless the operator allow-lists the host. Pure: a fake resolver stands in for DNS."""

from __future__ import annotations

import logging

import pytest

from keys.urlguard import (
    NOT_ALLOWED_MESSAGE,
    UrlRejected,
    address_refusal,
    check_host,
    parse_allowlist,
    validate_base_url,
)

PUBLIC = "93.184.216.34"


def resolver_for(mapping: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list[str]:
        if host not in mapping:
            raise OSError("no such host")
        return mapping[host]

    return resolve


DNS = resolver_for(
    {
        "api.example.com": [PUBLIC, "2606:2800:220:1:248:1893:25c8:1946"],
        "rebind.example.com": [PUBLIC, "10.0.0.5"],
        "metadata.example.com": ["169.254.169.254"],
        "localhost": ["127.0.0.1", "::1"],
        "vllm.internal": ["10.1.2.3"],
    }
)


def prod(url: str, allowlist: tuple[str, ...] = ()) -> str:
    return validate_base_url(url, production=True, allowlist=parse_allowlist(allowlist), resolver=DNS)


def dev(url: str, allowlist: tuple[str, ...] = ()) -> str:
    return validate_base_url(url, production=False, allowlist=parse_allowlist(allowlist), resolver=DNS)


def test_public_https_url_is_accepted_and_normalized():
    assert prod("https://API.example.com/v1/") == "https://api.example.com/v1"
    assert prod("https://api.example.com:8443/openai/v1") == "https://api.example.com:8443/openai/v1"
    assert prod(f"https://{PUBLIC}/v1") == f"https://{PUBLIC}/v1"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://127.0.0.1:11434/v1", "loopback"),
        ("https://localhost/v1", "loopback"),
        ("https://[::1]/v1", "loopback"),
        ("https://10.0.0.1/v1", "private"),
        ("https://172.16.5.4/v1", "private"),
        ("https://192.168.1.10/v1", "private"),
        ("https://[fd00::1]/v1", "private"),
        ("https://169.254.169.254/latest/meta-data", "metadata"),
        ("https://169.254.10.10/", "link-local"),
        ("https://[fe80::1]/", "link-local"),
        ("https://0.0.0.0/", "unspecified"),
        ("https://[::]/", "unspecified"),
        ("https://100.64.0.1/", "non-public"),
        ("https://100.100.100.200/", "metadata"),
        ("https://224.0.0.1/", "multicast"),
        ("https://240.0.0.1/", "private"),
        ("https://[::ffff:127.0.0.1]/", "loopback"),
        ("https://[::ffff:169.254.169.254]/", "metadata"),
        ("https://[64:ff9b::a00:1]/", "private"),
        ("https://metadata.example.com/", "metadata"),
        ("https://rebind.example.com/", "private"),
        ("https://vllm.internal/v1", "private"),
    ],
)
def test_production_refuses_internal_addresses(url, words, caplog):
    with caplog.at_level(logging.INFO, logger="keys.urlguard"), pytest.raises(UrlRejected) as info:
        prod(url)
    # The user gets the one generic message; why (and what the name resolved to) is in the operator's log.
    assert str(info.value) == NOT_ALLOWED_MESSAGE
    assert "CESAFLOW_PROVIDER_HOST_ALLOWLIST" in str(info.value)
    assert words in caplog.text


def test_development_allows_loopback_but_nothing_else_internal():
    assert dev("http://127.0.0.1:11434/v1") == "http://127.0.0.1:11434/v1"
    assert dev("http://localhost:8080/openai/v1") == "http://localhost:8080/openai/v1"
    assert dev("http://[::1]:8080") == "http://[::1]:8080"
    for url in ("http://10.0.0.1/v1", "http://169.254.169.254/", "http://0.0.0.0:8000/", "http://vllm.internal/"):
        with pytest.raises(UrlRejected):
            dev(url)


def test_allowlisted_hosts_pass_in_production():
    assert prod("http://vllm.internal:8000/v1", allowlist=("vllm.internal",)) == "http://vllm.internal:8000/v1"
    assert prod("https://10.1.2.3/v1", allowlist=("10.0.0.0/8",)) == "https://10.1.2.3/v1"
    assert prod("https://vllm.internal/v1", allowlist=("10.1.2.0/24",)) == "https://vllm.internal/v1"
    assert prod("https://vllm.internal:8443/v1", allowlist=("vllm.internal:8443",)) == "https://vllm.internal:8443/v1"
    with pytest.raises(UrlRejected):
        prod("https://vllm.internal:9999/v1", allowlist=("vllm.internal:8443",))


def test_production_refuses_plain_http_to_hosts_not_on_the_allowlist():
    with pytest.raises(UrlRejected) as info:
        prod("http://api.example.com/v1")
    assert str(info.value) == NOT_ALLOWED_MESSAGE  # which says: public HTTPS endpoints only
    assert dev("http://api.example.com/v1") == "http://api.example.com/v1"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://api.example.com/",
        "file:///etc/passwd",
        "gopher://api.example.com/",
        "api.example.com/v1",
        "https://",
        "https://user:pass@api.example.com/v1",
        "https://user@api.example.com/v1",
        "https://api.example.com/v1?x=1",
        "https://api.example.com/v1#frag",
        "https://api.example.com:99999/",
        "https://api.example.com:port/",
        "https://api.exa mple.com/",
        "https://api.example.com/v1\r\nHost: evil",
        "https://127.0.0.1\\@api.example.com/",
        "https://bücher.example/",
        "https://unknown.example.com/",
        "",
        "https://" + "a" * 600 + ".com/",
    ],
)
def test_malformed_or_unsafe_urls_are_refused_with_a_message(url):
    with pytest.raises(UrlRejected) as info:
        dev(url)
    assert str(info.value)


def test_the_message_never_echoes_credentials():
    with pytest.raises(UrlRejected) as info:
        prod("https://admin:hunter2-secret@api.example.com/")
    assert "hunter2" not in str(info.value)


def test_check_host_returns_the_checked_addresses_for_pinning():
    addresses = check_host("api.example.com", 443, production=True, allowlist=frozenset(), resolver=DNS)
    assert [str(a) for a in addresses] == [PUBLIC, "2606:2800:220:1:248:1893:25c8:1946"]


def test_address_refusal_names_each_category():
    from ipaddress import ip_address

    assert address_refusal(ip_address("8.8.8.8"), allow_loopback=False) is None
    assert address_refusal(ip_address("127.0.0.1"), allow_loopback=True) is None
    assert address_refusal(ip_address("127.0.0.1"), allow_loopback=False) == "a loopback address"
    assert address_refusal(ip_address("fd00:ec2::254"), allow_loopback=True) == "a cloud metadata address"


def test_an_internal_name_gets_the_generic_message_and_the_log_gets_the_answer(caplog):
    with caplog.at_level(logging.INFO, logger="keys.urlguard"):
        with pytest.raises(UrlRejected) as internal:
            prod("https://vllm.internal/v1")
        with pytest.raises(UrlRejected) as missing:
            prod("https://nowhere.internal/v1")
    # Nothing of what the resolver said: no address, no category, and no telling a name that resolves internally
    # from one that does not resolve at all (that difference alone maps the internal DNS).
    assert str(internal.value) == str(missing.value) == NOT_ALLOWED_MESSAGE
    for leak in ("10.1.2.3", "resolve", "private"):
        assert leak not in str(internal.value)
    assert "'vllm.internal' resolves to 10.1.2.3, which is a private address" in caplog.text
    assert "'nowhere.internal' could not be resolved" in caplog.text
