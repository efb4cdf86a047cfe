from django.apps import AppConfig


class NexusConfig(AppConfig):
    name = "nexus"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from nexus import checks  # noqa: F401  # registers the system checks
