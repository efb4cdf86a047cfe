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
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Collection, Iterable
from urllib.parse import urlsplit

from cesaflow.lib.http import IPAddress, address_allowlisted
from cesaflow.lib.http import address_refusal as address_refusal  # one classification for both guards

Resolver = Callable[[str, int], Iterable[str]]

MAX_URL_LENGTH = 500


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
        except (OSError, UnicodeError):
            raise UrlRejected(f"The host {name!r} could not be resolved.") from None
        addresses = []
        for text in resolved:
            try:
                # Drop an IPv6 zone id ("fe80::1%eth0"); the address itself is what is judged.
                addresses.append(ipaddress.ip_address(text.split("%", 1)[0]))
            except ValueError:
                raise UrlRejected(f"The host {name!r} resolved to an unusable address.") from None
        if not addresses:
            raise UrlRejected(f"The host {name!r} could not be resolved.")
    if trusted:
        return addresses
    for address in addresses:
        reason = address_refusal(address, allow_loopback=not production)
        if reason is not None and not address_allowlisted(address, allowlist):
            where = "is" if literal is not None else f"resolves to {address}, which is"
            raise UrlRejected(
                f"The host {name!r} {where} {reason}. Ask your operator to add it to "
                "CESAFLOW_PROVIDER_HOST_ALLOWLIST if it is meant to be reachable."
            )
    return addresses


def validate_base_url(
    url: str,
    *,
    production: bool,
    allowlist: Collection[str],
    resolver: Resolver = system_resolver,
) -> str:
    """The normalized base URL (no trailing slash), or ``UrlRejected`` with a message for the user."""
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
    if scheme not in {"http", "https"}:
        raise UrlRejected("The base URL must start with https:// (or http://).")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise UrlRejected("The base URL must not contain a user name or password; the key goes in the key field.")
    host = parts.hostname
    if not host:
        raise UrlRejected("The base URL needs a host name.")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise UrlRejected("The base URL must not have a query string or fragment.")
    name = normalize_host(host)
    port_or_default = port or (443 if scheme == "https" else 80)
    check_host(name, port_or_default, production=production, allowlist=allowlist, resolver=resolver)
    if production and scheme == "http" and not host_allowlisted(name, port_or_default, allowlist):
        raise UrlRejected("Use https:// (plain http is only allowed for allow-listed hosts).")
    netloc = f"[{name}]" if ":" in name else name
    if port is not None:
        netloc = f"{netloc}:{port}"
    path = parts.path.rstrip("/")
    return f"{scheme}://{netloc}{path}"
