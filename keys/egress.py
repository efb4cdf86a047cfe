"""The deployment's outbound-call policy, from settings, for every provider call and key check.

Two layers guard customer-chosen base URLs (issue #3 point 6) and they must agree on what is reachable:
``keys.urlguard`` when a URL is saved, and the connect-time guard of ``cesaflow.lib.http`` on every connection
(DNS rebinding). The rule for both:

* production: public addresses only, plus the operator's ``CESAFLOW_PROVIDER_HOST_ALLOWLIST`` (host names,
  ``host:port``, IPs or CIDR networks);
* development: the same, plus loopback (the provider simulator lives there). Private ranges, link-local and cloud
  metadata addresses stay refused in development too: a laptop on an office network should not let a
  ``base_url`` reach the office's internal services. Allow-list them when they are meant to be reachable.

Built at call time (settings are never read at import) and cheap: equal policies compare equal, so
``get_http_client`` hands every caller of one event loop the same pooled client.
"""

from __future__ import annotations

from django.conf import settings

from cesaflow.lib.http import EgressPolicy

# Loopback only, as CIDR networks: the connect-time guard allows these addresses whatever name resolves to them.
# The IPv4-mapped form is listed too because urlguard judges an embedded IPv4 address as that address.
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128", "::ffff:127.0.0.0/104")


def egress_policy() -> EgressPolicy:
    """The policy for this deployment (``settings.PRODUCTION``, ``settings.PROVIDER_HOST_ALLOWLIST``)."""
    allowlist = list(settings.PROVIDER_HOST_ALLOWLIST)
    if not settings.PRODUCTION:
        allowlist.extend(LOOPBACK_NETWORKS)
    # allow_private stays False in every mode: "private" in the HTTP layer means every non-public address,
    # which is wider than the loopback-only rule urlguard applies to saved URLs.
    return EgressPolicy.build(allow_private=False, allowlist=allowlist)
