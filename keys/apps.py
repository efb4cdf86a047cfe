from django.apps import AppConfig


class KeysConfig(AppConfig):
    name = "keys"
    verbose_name = "Provider keys"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Register the keyring system checks (stored kids must stay decryptable).
        from keys import checks  # noqa: F401
        from keys.signals import provider_keys_disabled_all
        from orgs.revocation import signal_org_on_commit

        # "Disable all keys" is an incident response: the org's open streams re-check their credentials too.
        provider_keys_disabled_all.connect(
            lambda sender, org, **kwargs: signal_org_on_commit(org), weak=False, dispatch_uid="revocation_keys_off"
        )
