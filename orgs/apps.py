from django.apps import AppConfig


class OrgsConfig(AppConfig):
    name = "orgs"
    verbose_name = "Organizations"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Open streams hear about revoked keys, removed members and demotions (orgs.revocation); api_key_cache
        # invalidates on model changes; checks registers the deployment checks.
        from orgs import api_key_cache, checks, revocation  # noqa: F401
