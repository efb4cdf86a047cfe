"""The one outbound HTTP client per process and event loop, with an SSRF guard applied at connect time.

Provider base URLs can be chosen by customers (``openai_compatible``), so every outbound connection is checked
*after* DNS resolution, against the address actually dialled: a name that resolves to 127.0.0.1, a private network,
a link-local or cloud-metadata address is refused unless the caller's policy allows it. Checking the URL text alone
would miss DNS tricks; checking at connect time also pins the connection to the address that was checked.

This module reads no settings: callers build an :class:`EgressPolicy` (production: ``allow_private=False`` plus an
explicit allowlist; development: ``allow_private=True``) and ask for the client that enforces it. In practice a
process uses one policy, hence one client (and one connection pool) per event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Sized for thousands of concurrent provider streams per process: a stream holds one connection for its lifetime.
DEFAULT_LIMITS = httpx.Limits(max_connections=8192, max_keepalive_connections=1024, keepalive_expiry=60.0)
# Per-request timeouts normally come from the caller (adapters pass their own); these are the fallbacks.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=120.0, write=30.0, pool=30.0)

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class EgressDenied(httpx.ConnectError):
    """An outbound connection was refused by the egress policy. The message names the host, never a secret."""


@dataclass(frozen=True)
class EgressPolicy:
    """Which destinations outbound calls may reach.

    ``allow_private``: allow loopback, private, link-local, metadata and other non-global addresses
    (development and tests). ``allowlist``: host names, ``host:port`` pairs, IP addresses or CIDR networks that
    are allowed even when ``allow_private`` is false (e.g. an internal OpenAI-compatible gateway).
    """

    allow_private: bool = False
    allowlist: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def build(cls, *, allow_private: bool, allowlist: Iterable[str] = ()) -> EgressPolicy:
        cleaned = frozenset(entry.strip().lower().strip("[]") for entry in allowlist if entry.strip())
        return cls(allow_private=allow_private, allowlist=cleaned)

    def host_allowlisted(self, host: str, port: int | None) -> bool:
        host = host.lower().strip("[]")
        return host in self.allowlist or (port is not None and f"{host}:{port}" in self.allowlist)

    def address_allowed(self, address: IPAddress) -> bool:
        return self.allow_private or not is_forbidden_address(address) or address_allowlisted(address, self.allowlist)


# Cloud instance-metadata endpoints, named so an error says what was hit. All are non-public addresses and refused
# anyway; fd00:ec2::254 (AWS IPv6) is in fc00::/7, 100.100.100.200 (Alibaba) is CGNAT.
_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """IPv4 addresses carried inside IPv6 forms that reach the IPv4 host (mapped, NAT64, 6to4, Teredo)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def address_refusal(address: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why ``address`` must not be connected to ("a loopback address", …), or None for a public address.

    The one classification for both guards: the connect-time one here and the save-time ``keys.urlguard``, whose
    messages go back to an admin who typed the URL and needs to know what to change or allow-list.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = embedded_ipv4(address)
        if embedded is not None:
            return address_refusal(embedded, allow_loopback=allow_loopback)
    if address in _METADATA:
        return "a cloud metadata address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return None if allow_loopback else "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local):
        return "a private address"
    if not address.is_global or address.is_reserved:
        return "a non-public address"
    return None


def is_forbidden_address(address: IPAddress) -> bool:
    """True for anything that is not a plain public unicast address (loopback, private, link-local, metadata,
    CGNAT, multicast, reserved, unspecified), including IPv4 addresses smuggled inside IPv6 forms."""
    return address_refusal(address) is not None


def address_allowlisted(address: IPAddress, allowlist: Iterable[str]) -> bool:
    """Whether an IP or CIDR entry of ``allowlist`` covers ``address`` (host-name entries are skipped)."""
    for entry in allowlist:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a host name entry, not an address
    return False


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_url(url: str | httpx.URL, policy: EgressPolicy) -> None:
    """Cheap checks on a URL before any network I/O: http(s) only, no credentials, and IP literals against the
    policy. Names are checked again at connect time, after resolution. Raises :class:`EgressDenied`."""
    parsed = httpx.URL(url) if isinstance(url, str) else url
    if parsed.scheme not in ("http", "https"):
        raise EgressDenied(f"Only http and https URLs are allowed, not {parsed.scheme or 'no scheme'!r}.")
    if not parsed.host:
        raise EgressDenied("The URL has no host.")
    if parsed.userinfo:
        raise EgressDenied("URLs must not carry credentials.")
    if policy.allow_private or policy.host_allowlisted(parsed.host, parsed.port):
        return
    address = _literal_address(parsed.host)
    if address is not None and not policy.address_allowed(address):
        raise EgressDenied(f"Connections to {parsed.host} are not allowed (private or reserved address).")


async def resolve_allowed(host: str, port: int, policy: EgressPolicy) -> list[str]:
    """Resolve ``host`` and return the addresses the policy allows, in resolver order. Raises EgressDenied if the
    name resolves only to forbidden addresses; OSError (socket.gaierror) if it does not resolve."""
    literal = _literal_address(host)
    if literal is not None:
        candidates = [literal]
    else:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        candidates = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if address not in candidates:
                candidates.append(address)
    allowed = [str(a) for a in candidates if policy.address_allowed(a)]
    if not allowed:
        raise EgressDenied(f"Connections to {host} are not allowed (it resolves to a private or reserved address).")
    return allowed


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves the host itself, drops forbidden addresses and dials the checked address (no second lookup that a
    rebinding DNS server could answer differently). TLS still verifies the original host name: httpcore passes the
    origin host as SNI / server_hostname independently of the address dialled."""

    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self._policy.allow_private or self._policy.host_allowlisted(host, port):
            return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        try:
            async with asyncio.timeout(timeout):
                addresses = await resolve_allowed(host, port, self._policy)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"Resolving {host} timed out.") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"Could not resolve {host}: {exc.strerror or exc}") from None
        last_error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        if last_error is None:  # unreachable: resolve_allowed never returns an empty list
            raise EgressDenied(f"No allowed address for {host}.")
        raise last_error

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise EgressDenied("Unix sockets are not allowed for outbound calls.")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with the connection pool's network backend replaced by the guarded one."""

    def __init__(self, policy: EgressPolicy, *, limits: httpx.Limits = DEFAULT_LIMITS) -> None:
        super().__init__(limits=limits, trust_env=False)
        self._policy = policy
        # httpx 0.28 builds its pool without a network_backend argument; rebuild it with ours (same options).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_GuardedBackend(policy),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            check_url(request.url, self._policy)
        except EgressDenied as exc:
            exc.request = request
            raise
        return await super().handle_async_request(request)


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[EgressPolicy, httpx.AsyncClient]]
_clients = weakref.WeakKeyDictionary()


def get_http_client(policy: EgressPolicy) -> httpx.AsyncClient:
    """The shared client for the running event loop and this policy (created on first use).

    httpx clients are bound to the loop their connections were opened on, hence one per loop. Redirects are not
    followed (a redirect to an internal address is a classic SSRF) and the environment (proxies, .netrc) is ignored.
    """
    loop = asyncio.get_running_loop()
    per_loop = _clients.setdefault(loop, {})
    client = per_loop.get(policy)
    if client is None or client.is_closed:
        client = httpx.AsyncClient(
            transport=GuardedTransport(policy),
            timeout=DEFAULT_TIMEOUT,
            follow_redirects=False,
            trust_env=False,
        )
        per_loop[policy] = client
    return client


async def close_http_clients() -> None:
    """Close the running loop's shared clients (shutdown hooks and tests)."""
    per_loop = _clients.pop(asyncio.get_running_loop(), {})
    for client in per_loop.values():
        await client.aclose()


# httpx's response stream -> its httpcore stream -> the pool's stream -> the HTTP/1.1 connection's -> the connection
# -> its h11.Connection (httpx 0.28, httpcore 1.0; GuardedTransport keeps httpx's own transport and pool classes).
_TO_H11_STATE = ("_stream", "_httpcore_stream", "_stream", "_connection", "_h11_state")


def body_bytes_received(response: httpx.Response) -> bool:
    """Whether the next read of ``response``'s streamed body returns at once, from bytes already received.

    An upstream that streams faster than it is read puts many HTTP chunks in one TCP segment, and httpx hands them
    out one chunk per read; a consumer that forwards the stream writes once for all the reads it can make without
    waiting for the network, rather than once per chunk (the gateway, issue #13: its client writes). httpx does not
    say whether a read will wait, so this looks into httpcore's HTTP/1.1 connection, at h11's receive buffer; both
    are pinned (``requirements.lock``) and ``tests/test_http_client.py`` fails if they stop matching. Anything else
    (another transport, HTTP/2, a buffer this cannot read) answers False: every read is then taken as one that may
    wait, which costs writes and never delays one.
    """
    state: Any = response.stream
    try:
        for name in _TO_H11_STATE:
            state = getattr(state, name)
        buffered = state.trailing_data[0]
    except (AttributeError, IndexError, TypeError):
        return False
    if not isinstance(buffered, bytes | bytearray) or not buffered:
        return False
    if "chunked" not in response.headers.get("transfer-encoding", "").lower():
        return True  # a body sized by Content-Length or by the connection's close: any byte received is body
    # Between two chunks h11 holds the end of the chunk just read (CRLF), then the next chunk's size line
    # (``<hex size>[;extensions]`` CRLF) and as much of its data as arrived. A read returns at once if at least one
    # byte of data is there. The size line alone waits for more; the last (empty) chunk ends the body: no data to
    # batch either way.
    if buffered[:2] == b"\r\n":
        buffered = buffered[2:]
    line_end = buffered.find(b"\r\n")
    if line_end < 0:
        return False
    try:
        size = int(bytes(buffered[:line_end]).split(b";", 1)[0], 16)
    except ValueError:
        return False
    return size > 0 and len(buffered) > line_end + 2
