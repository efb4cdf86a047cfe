from django.urls import URLPattern, URLResolver, path

from runs.api import projects_views, proxy_views, sse, usage_views, views

app_name = "runs_api"
urlpatterns: list[URLPattern | URLResolver] = [
    path("audit-events", views.AuditEventListView.as_view(), name="audit-event-list"),
    path("runs", views.RunListView.as_view(), name="run-list"),
    path("runs/<uuid:run_id>", views.RunDetailView.as_view(), name="run-detail"),
    path("runs/<uuid:run_id>/cancel", views.RunCancelView.as_view(), name="run-cancel"),
    path("runs/<uuid:run_id>/events", sse.RunEventsView.as_view(), name="run-events"),
    path("runs/<uuid:run_id>/workspace", views.RunWorkspaceView.as_view(), name="run-workspace"),
    path("usage", usage_views.UsageView.as_view(), name="usage"),
    path("projects", projects_views.ProjectListView.as_view(), name="project-list"),
    path("projects/<uuid:project_id>", projects_views.ProjectDetailView.as_view(), name="project-detail"),
    path("projects/<uuid:project_id>/files", projects_views.ProjectFilesView.as_view(), name="project-files"),
    path("projects/<uuid:project_id>/files/<path:path>", projects_views.ProjectFileView.as_view(), name="project-file"),
    path(
        "projects/<uuid:project_id>/workspace", projects_views.ProjectWorkspaceView.as_view(), name="project-workspace"
    ),
    # The OpenAI-compatible proxy (async views with their own error shape; see runs/api/proxy_views.py).
    path("chat/completions", proxy_views.chat_completions, name="chat-completions"),
    path("models", proxy_views.list_models, name="models"),
]
