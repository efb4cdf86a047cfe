from django.db import migrations, models


class Migration(migrations.Migration):
    """Start on attach. Runs that exist already were created under the old rule (start at once): they get
    ``watch=False`` so a run queued before the upgrade still executes; new runs default to watched."""

    dependencies = [
        ("runs", "0002_run_usagerecord_run_runs_run_org_created_and_more"),
    ]

    operations = [
        migrations.AddField(
            model_name="run",
            name="attached_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="run",
            name="watch",
            field=models.BooleanField(default=False),
        ),
        migrations.AlterField(
            model_name="run",
            name="watch",
            field=models.BooleanField(default=True),
        ),
    ]
