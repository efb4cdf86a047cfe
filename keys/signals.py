"""Domain signals sent by keys services, in the transaction of the change.

``runs`` records them in the audit trail (keys never imports runs). Every signal carries ``org`` (None only for
installation-wide events) and ``actor`` (a User, an ApiKey or None for the system). None of them ever carries a
secret or a sealed value: receivers get the ``ProviderKey`` row, whose repr shows only label and last four.
"""

from django.dispatch import Signal

provider_key_created = Signal()  # org, actor, provider_key
provider_key_checked = Signal()  # org, actor, provider_key, old_status, detail
provider_key_used = Signal()  # org, actor, provider_key, purpose, reference
provider_key_revoked = Signal()  # org, actor, provider_key
provider_keys_disabled_all = Signal()  # org, actor, provider_keys (the ones revoked now)
provider_key_decrypt_failed = Signal()  # org, actor, provider_key, kid, retired_kid, purpose, reference
# org=None: the installation-wide summary; org set: that org's share of it. actor is always None (an operator
# at the shell, not a member of the org).
provider_keys_rewrapped = Signal()  # org, actor, to_kid, from_kids, rewrapped, failed
