from django.urls import URLPattern, URLResolver, path

from keys.api import views

app_name = "keys_api"
urlpatterns: list[URLPattern | URLResolver] = [
    path("provider-keys", views.ProviderKeyListView.as_view(), name="provider-key-list"),
    path("provider-keys/<uuid:key_id>", views.ProviderKeyDetailView.as_view(), name="provider-key-detail"),
    path("provider-keys/<uuid:key_id>/check", views.ProviderKeyCheckView.as_view(), name="provider-key-check"),
]
