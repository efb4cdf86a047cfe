"""Dashboard URLs for provider keys (namespace ``keys``). Keys are addressed by UUID; the org comes from the
session (``orgs.tenancy``), never from the URL."""

from django.urls import URLPattern, URLResolver, path

from keys import views

app_name = "keys"
urlpatterns: list[URLPattern | URLResolver] = [
    path("provider-keys/", views.ProviderKeysView.as_view(), name="provider_keys"),
    path("provider-keys/disable-all/", views.ProviderKeysDisableAllView.as_view(), name="disable_all"),
    path("provider-keys/<uuid:key_id>/revoke/", views.ProviderKeyRevokeView.as_view(), name="revoke"),
    path("provider-keys/<uuid:key_id>/check/", views.ProviderKeyCheckView.as_view(), name="check"),
]
