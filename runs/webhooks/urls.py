"""The GitHub webhook route (namespace ``webhooks``), mounted at ``/hooks/github/`` by the project's urls."""

from django.urls import URLPattern, URLResolver, path

from runs.webhooks import views

app_name = "webhooks"
urlpatterns: list[URLPattern | URLResolver] = [
    path("<uuid:project_id>/", views.github_webhook, name="github"),
]
