from django.apps import AppConfig


class NexusConfig(AppConfig):
    name = "nexus"
    default_auto_field = "django.db.models.BigAutoField"
