from django.apps import AppConfig


class RunsConfig(AppConfig):
    name = "runs"
    verbose_name = "Runs and audit"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Connect the audit trail to the domain signals of orgs (and, later, keys).
        from cesaflow.lib.metrics import SHARED_REGISTRY
        from keys.sealed import SealedField, register_sealed_field
        from runs import audit  # noqa: F401
        from runs.metrics import RunStatesCollector
        from runs.models import Project
        from runs.webhooks.secrets import webhook_secret_aad

        # Key rotation (keys_rewrap, the keyring checks) covers projects' webhook secrets too.
        for field in ("github_secret_sealed", "github_previous_secret_sealed"):
            register_sealed_field(
                SealedField(
                    "project webhook secrets",
                    Project,
                    field,
                    lambda project: webhook_secret_aad(org_id=project.org_id, project_id=project.pk),
                )
            )

        # /metrics: queued and running runs, read from the database when scraped.
        SHARED_REGISTRY.register(RunStatesCollector())
