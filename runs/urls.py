"""Dashboard URLs for runs, projects, usage and the audit trail (namespace ``runs``). Runs and projects are addressed
by UUID; the org comes from the session, never from the URL."""

from django.urls import URLPattern, URLResolver, path

from runs import views
from runs.projects import views as project_views

app_name = "runs"
urlpatterns: list[URLPattern | URLResolver] = [
    path("audit/", views.AuditView.as_view(), name="audit"),
    path("audit/export.csv", views.AuditCsvView.as_view(), name="audit_csv"),
    path("projects/", project_views.ProjectListView.as_view(), name="project_list"),
    path("projects/<uuid:project_id>/", project_views.ProjectDetailView.as_view(), name="project_detail"),
    path("projects/<uuid:project_id>/edit/", project_views.ProjectEditView.as_view(), name="project_edit"),
    path("projects/<uuid:project_id>/delete/", project_views.ProjectDeleteView.as_view(), name="project_delete"),
    path("projects/<uuid:project_id>/runs/", project_views.ProjectRunsView.as_view(), name="project_runs"),
    path("projects/<uuid:project_id>/runs/new/", project_views.ProjectRunCreateView.as_view(), name="project_run_new"),
    path(
        "projects/<uuid:project_id>/workspace.zip",
        project_views.ProjectWorkspaceView.as_view(),
        name="project_workspace",
    ),
    path(
        "projects/<uuid:project_id>/github/connect/",
        project_views.ProjectGitHubConnectView.as_view(),
        name="project_github_connect",
    ),
    path(
        "projects/<uuid:project_id>/github/rotate/",
        project_views.ProjectGitHubRotateView.as_view(),
        name="project_github_rotate",
    ),
    path(
        "projects/<uuid:project_id>/github/disconnect/",
        project_views.ProjectGitHubDisconnectView.as_view(),
        name="project_github_disconnect",
    ),
    path("runs/", views.RunListView.as_view(), name="run_list"),
    path("runs/new/", views.RunCreateView.as_view(), name="run_new"),
    path("runs/new/models/", views.RunModelsView.as_view(), name="run_models"),
    path("runs/<uuid:run_id>/", views.RunDetailView.as_view(), name="run_detail"),
    path("runs/<uuid:run_id>/cancel/", views.RunCancelView.as_view(), name="run_cancel"),
    path("settings/agents/", views.AgentSettingsView.as_view(), name="agent_settings"),
    path("usage/", views.UsageView.as_view(), name="usage"),
    path("usage.csv", views.UsageCsvView.as_view(), name="usage_csv"),
]
