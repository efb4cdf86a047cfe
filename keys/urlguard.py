"""Validation of custom provider base URLs: the server-side request forgery guard (issue #3, point 6).

Pure module: no settings, no ORM. Callers pass the deployment mode and the operator's allowlist
(``settings.PRODUCTION``, ``settings.PROVIDER_HOST_ALLOWLIST``).

Rules:

* scheme ``http`` or ``https``; a host; no credentials, query or fragment in the URL;
* in production, a host that is (or resolves to) a loopback, private, link-local (cloud metadata lives there),
  shared/CGNAT, unspecified, multicast, reserved or otherwise non-public address is refused, unless the host is
  on the allowlist (host names, ``host:port``, IPs or CIDR networks); so is plain ``http`` to a host that is
  not on the allowlist (the key would cross the network in clear text);
* in development, loopback is allowed (the provider simulator lives there); everything else is as in production.

Saving a URL checks what the name resolves to now; the HTTP layer checks again when it connects
(``cesaflow.lib.http``; DNS rebinding: a name can resolve differently later).

A refused address gets one generic message (``NOT_ALLOWED_MESSAGE``), whatever the reason: naming the address a
host resolved to, or telling "does not resolve" from "resolves to a private address", would let anyone who can
add a key map the internal DNS of the network CesaFlow runs in. The details go to the log for the operator.

``normalize_base_url`` is the one normalized form of a base URL: what is stored, and what a provider key's
ciphertext is bound to (``keys.providers.provider_destination``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Collection, Iterable
from contextlib import suppress
from dataclasses import dataclass
from urllib.parse import urlsplit

from cesaflow.lib.http import IPAddress, address_allowlisted
from cesaflow.lib.http import address_refusal as address_refusal  # one classification for both guards

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Iterable[str]]

MAX_URL_LENGTH = 500
DEFAULT_PORTS = {"https": 443, "http": 80}

# The same words for every refused destination (a name that does not resolve, resolves to an internal address, or
# is one): the user learns what to do, not what the network looks like.
NOT_ALLOWED_MESSAGE = (
    "This address is not allowed: CesaFlow only calls public HTTPS endpoints. Check the host name; for a server on "
    "an internal network, ask your operator to add it to CESAFLOW_PROVIDER_HOST_ALLOWLIST."
)


class UrlRejected(ValueError):
    """A base URL (or a host it resolves to) is not allowed. The message is safe to show the user."""


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to right now (A and AAAA)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def normalize_host(host: str) -> str:
    """Lowercase, without IPv6 brackets or a trailing dot: the form allowlist entries are compared in."""
    return host.strip().strip("[]").rstrip(".").lower()


def parse_allowlist(entries: Iterable[str]) -> frozenset[str]:
    """Allowlist entries as compared: host names, ``host:port``, IP addresses or CIDR networks (the same
    vocabulary as the connect-time guard in ``cesaflow.lib.http``)."""
    return frozenset(h for h in (e.strip().lower().strip("[]").rstrip(".") for e in entries) if h)


def host_allowlisted(host: str, port: int, allowlist: Collection[str]) -> bool:
    name = normalize_host(host)
    return name in allowlist or f"{name}:{port}" in allowlist


def check_host(
    host: str,
    port: int,
    *,
    production: bool,
    allowlist: Collection[str],
    resolver: Resolver = system_resolver,
) -> list[IPAddress]:
    """The addresses ``host`` resolves to, all of which may be connected to; raises ``UrlRejected`` otherwise.

    Allow-listed hosts are trusted as the operator configured them (any address). The HTTP layer should connect
    to one of the returned addresses, not resolve the name a second time.
    """
    name = normalize_host(host)
    trusted = host_allowlisted(name, port, allowlist)
    try:
        literal: IPAddress | None = ipaddress.ip_address(name)
    except ValueError:
        literal = None
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        try:
            resolved = list(resolver(name, port))
        except (OSError, UnicodeError) as exc:
            logger.info("base URL refused: the host %r could not be resolved (%s)", name, type(exc).__name__)
            raise UrlRejected(NOT_ALLOWED_MESSAGE) from None
        addresses = []
        for text in resolved:
            try:
                # Drop an IPv6 zone id ("fe80::1%eth0"); the address itself is what is judged.
                addresses.append(ipaddress.ip_address(text.split("%", 1)[0]))
            except ValueError:
                logger.warning("base URL refused: the host %r resolved to an unusable address %r", name, text[:100])
                raise UrlRejected(NOT_ALLOWED_MESSAGE) from None
        if not addresses:
            logger.info("base URL refused: the host %r resolved to no address", name)
            raise UrlRejected(NOT_ALLOWED_MESSAGE)
    if trusted:
        return addresses
    for address in addresses:
        reason = address_refusal(address, allow_loopback=not production)
        if reason is not None and not address_allowlisted(address, allowlist):
            logger.warning(
                "base URL refused: the host %r %s %s (not in CESAFLOW_PROVIDER_HOST_ALLOWLIST)",
                name,
                "is" if literal is not None else f"resolves to {address}, which is",
                reason,
            )
            raise UrlRejected(NOT_ALLOWED_MESSAGE)
    return addresses


@dataclass(frozen=True)
class _BaseUrl:
    scheme: str
    host: str  # normalize_host form; IP literals in their canonical (compressed) form
    port: int  # explicit or the scheme's default
    path: str  # without trailing slashes

    @property
    def normalized(self) -> str:
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != DEFAULT_PORTS[self.scheme]:
            netloc = f"{netloc}:{self.port}"
        return f"{self.scheme}://{netloc}{self.path}"


def _parse_base_url(url: str) -> _BaseUrl:
    """Shape checks only (no DNS). Raises ``UrlRejected`` with a message for the user."""
    url = url.strip()
    if not url:
        raise UrlRejected("Enter a base URL.")
    if len(url) > MAX_URL_LENGTH:
        raise UrlRejected(f"The base URL must be at most {MAX_URL_LENGTH} characters.")
    if not url.isascii() or "\\" in url or any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise UrlRejected("The base URL must be plain ASCII without spaces (use punycode for international names).")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UrlRejected("The base URL is not a valid URL.") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UrlRejected("The base URL must start with https:// (or http://).")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise UrlRejected("The base URL must not contain a user name or password; the key goes in the key field.")
    host = normalize_host(parts.hostname or "")
    if not host:
        raise UrlRejected("The base URL needs a host name.")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise UrlRejected("The base URL must not have a query string or fragment.")
    with suppress(ValueError):  # an address literal takes its canonical form; a name stays as it is
        host = ipaddress.ip_address(host).compressed
    return _BaseUrl(
        scheme=scheme, host=host, port=DEFAULT_PORTS[scheme] if port is None else port, path=parts.path.rstrip("/")
    )


def normalize_base_url(url: str) -> str:
    """The one normalized form of a base URL: lowercase scheme and host, no trailing dot on the host, IP addresses
    in canonical form, no default port (443 for https, 80 for http), no trailing slash. Spellings of one
    destination normalize to the same text; another scheme, host, port or path never does (the path keeps its
    case). Shape checks only, no DNS; raises ``UrlRejected``."""
    return _parse_base_url(url).normalized


def validate_base_url(
    url: str,
    *,
    production: bool,
    allowlist: Collection[str],
    resolver: Resolver = system_resolver,
) -> str:
    """The normalized base URL (``normalize_base_url``), or ``UrlRejected`` with a message for the user."""
    parsed = _parse_base_url(url)
    # Before any DNS lookup, and with the same words as an internal address (an Ollama at http://127.0.0.1 needs
    # the allowlist for both reasons): which message comes back must not depend on what a name resolves to.
    if production and parsed.scheme == "http" and not host_allowlisted(parsed.host, parsed.port, allowlist):
        logger.info(
            "base URL refused: plain http to the host %r (not in CESAFLOW_PROVIDER_HOST_ALLOWLIST)", parsed.host
        )
        raise UrlRejected(NOT_ALLOWED_MESSAGE)
    check_host(parsed.host, parsed.port, production=production, allowlist=allowlist, resolver=resolver)
    return parsed.normalized
