"""Dashboard URLs for runs, usage and the audit trail (namespace ``runs``). Runs are addressed by UUID; the org
comes from the session, never from the URL."""

from django.urls import URLPattern, URLResolver, path

from runs import views

app_name = "runs"
urlpatterns: list[URLPattern | URLResolver] = [
    path("audit/", views.AuditView.as_view(), name="audit"),
    path("audit/export.csv", views.AuditCsvView.as_view(), name="audit_csv"),
    path("runs/", views.RunListView.as_view(), name="run_list"),
    path("runs/new/", views.RunCreateView.as_view(), name="run_new"),
    path("runs/new/models/", views.RunModelsView.as_view(), name="run_models"),
    path("runs/<uuid:run_id>/", views.RunDetailView.as_view(), name="run_detail"),
    path("runs/<uuid:run_id>/cancel/", views.RunCancelView.as_view(), name="run_cancel"),
    path("settings/agents/", views.AgentSettingsView.as_view(), name="agent_settings"),
    path("usage/", views.UsageView.as_view(), name="usage"),
    path("usage.csv", views.UsageCsvView.as_view(), name="usage_csv"),
]
