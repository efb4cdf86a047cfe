"""System checks for Nexus settings that the settings module cannot fully validate on its own."""

from __future__ import annotations

import ipaddress
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, register


@register(Tags.security)
def check_allowed_ips(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """nexus.E001: an allowlist entry that is neither an IP address nor a CIDR network. The middleware would
    refuse everyone (fail closed); this says why at startup instead of with a 404."""
    errors: list[CheckMessage] = []
    for entry in settings.NEXUS_ALLOWED_IPS:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            errors.append(
                Error(
                    f"CESAFLOW_NEXUS_ALLOWED_IPS: {entry!r} is not an IP address or a CIDR network.",
                    hint="Use addresses such as 203.0.113.7 or networks such as 10.0.0.0/8, comma-separated.",
                    id="nexus.E001",
                )
            )
    return errors
