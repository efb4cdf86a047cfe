from django.apps import AppConfig


class OrgsConfig(AppConfig):
    name = "orgs"
    verbose_name = "Organizations"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Open streams hear about revoked keys, removed members and demotions (orgs.revocation).
        from orgs import api_key_cache, revocation  # noqa: F401  # api_key_cache: invalidation on model changes
