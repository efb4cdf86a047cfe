"""Deployment checks for how CesaFlow sees its clients (``manage.py check --deploy``).

Client IPs key the login locks and the rate limits and land in the audit trail. Production runs behind the
TLS-terminating proxy the README requires; unless CesaFlow trusts that proxy's ``X-Forwarded-For``, every client has
the proxy's address, and one client's failed logins lock everyone out. Whether a proxy sets the header is not
something settings can know, so an *unset* ``CESAFLOW_TRUST_X_FORWARDED_FOR`` in production is a warning: the
operator answers it with ``true`` (the proxy sets it) or ``false`` (clients connect directly, or the proxy does
not forward). At run time ``cesaflow.lib.middleware.client_ip`` also logs, once per process, when requests do
carry the header while it is not trusted.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Tags, Warning, register


@register(Tags.security, deploy=True)
def check_forwarded_for_decided(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """orgs.W001: production with ``CESAFLOW_TRUST_X_FORWARDED_FOR`` left unset."""
    if not settings.PRODUCTION or settings.TRUST_X_FORWARDED_FOR_SET:
        return []
    return [
        Warning(
            "CESAFLOW_TRUST_X_FORWARDED_FOR is not set: behind the TLS proxy production runs behind, every client "
            "would have the proxy's address, and one login lock or rate limit would hit everyone.",
            hint="Set it to true when your proxy sets X-Forwarded-For (nginx: proxy_set_header X-Forwarded-For "
            "$proxy_add_x_forwarded_for), or to false when clients connect to CesaFlow directly.",
            id="orgs.W001",
        )
    ]
