from django.apps import AppConfig


class KeysConfig(AppConfig):
    name = "keys"
    verbose_name = "Provider keys"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Register the keyring system checks (stored kids must stay decryptable).
        from keys import checks  # noqa: F401
