from django.apps import AppConfig


class NexusConfig(AppConfig):
    name = "nexus"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from keys.sealed import SealedField, register_sealed_field
        from nexus import checks  # noqa: F401  # registers the system checks
        from nexus.models import Operator
        from nexus.totp import totp_aad

        # Key rotation (keys_rewrap, the keyring checks) covers operators' TOTP secrets too.
        register_sealed_field(
            SealedField("operator TOTP secrets", Operator, "totp_sealed", lambda operator: totp_aad(operator.pk))
        )
