from django.urls import URLPattern, URLResolver, path

from runs.api import views

app_name = "runs_api"
urlpatterns: list[URLPattern | URLResolver] = [
    path("audit-events", views.AuditEventListView.as_view(), name="audit-event-list"),
]
