"""Dashboard URLs for runs and the audit trail (namespace ``runs``)."""

from django.urls import URLPattern, URLResolver, path

from runs import views

app_name = "runs"
urlpatterns: list[URLPattern | URLResolver] = [
    path("audit/", views.AuditView.as_view(), name="audit"),
    path("audit/export.csv", views.AuditCsvView.as_view(), name="audit_csv"),
]
