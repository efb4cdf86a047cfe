from csp.decorators import csp_update
from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.urls import URLPattern, URLResolver, include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView

from cesaflow import views
from nexus.site import nexus_site

api_v1: list[URLPattern | URLResolver] = [
    path("", include("orgs.api.urls")),
    path("", include("keys.api.urls")),
    path("", include("runs.api.urls")),
    path("schema/", login_not_required(SpectacularAPIView.as_view()), name="schema"),
    # Redoc renders with styled-components (inline <style>) and a blob: worker; scripts stay 'self' only.
    path(
        "docs/",
        login_not_required(
            csp_update({"style-src": ["'unsafe-inline'"], "worker-src": ["blob:"]})(
                SpectacularRedocView.as_view(url_name="schema")
            )
        ),
        name="docs",
    ),
]

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
    path("api/v1/", include(api_v1)),
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
