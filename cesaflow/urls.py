from csp.decorators import csp_update
from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import URLPattern, URLResolver, include, path, re_path
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView

from cesaflow import views
from cesaflow.lib.api import ApiDocsPermission, error_body
from nexus.site import nexus_site

# Public with CESAFLOW_API_DOCS_PUBLIC (development), else an org API key or a dashboard session.
DOCS = [ApiDocsPermission]

api_v1: list[URLPattern | URLResolver] = [
    path("", include("orgs.api.urls")),
    path("", include("keys.api.urls")),
    path("", include("runs.api.urls")),
    path("schema/", login_not_required(SpectacularAPIView.as_view(permission_classes=DOCS)), name="schema"),
    # Redoc renders with styled-components (inline <style>) and a blob: worker; scripts stay 'self' only.
    path(
        "docs/",
        login_not_required(
            csp_update({"style-src": ["'unsafe-inline'"], "worker-src": ["blob:"]})(
                SpectacularRedocView.as_view(url_name="schema", permission_classes=DOCS)
            )
        ),
        name="docs",
    ),
]


@login_not_required
@csrf_exempt
def api_not_found(request: HttpRequest) -> HttpResponse:
    """Any method on a path under /api/ that names nothing."""
    return JsonResponse(error_body("not_found", "Not found."), status=404)


urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
    path("api/v1/", include(api_v1)),
    # Whatever else is under /api/ is the API's 404 in its one JSON shape, with DEBUG too (Django's debug 404 page
    # is HTML, and never reaches handler404).
    re_path(r"^api/", api_not_found, name="api-not-found"),
    path("hooks/github/", include("runs.webhooks.urls")),  # signed by GitHub: no session, no CSRF
    path("", include("keys.urls")),
    path("", include("runs.urls")),
    path("", include("orgs.urls")),
]

if settings.NEXUS_ENABLED:
    # The operators' admin (nexus.site): off means no URL at all, so /<prefix>/ is an ordinary 404.
    urlpatterns.insert(0, path(f"{settings.NEXUS_PREFIX}/", nexus_site.urls))

handler400 = "cesaflow.views.bad_request"
handler403 = "cesaflow.views.permission_denied"
handler404 = "cesaflow.views.page_not_found"
handler500 = "cesaflow.views.server_error"
