from django.urls import URLPattern, URLResolver, path

from orgs.api import views

app_name = "orgs_api"
urlpatterns: list[URLPattern | URLResolver] = [
    path("org", views.OrganizationView.as_view(), name="org"),
    path("members", views.MemberListView.as_view(), name="member-list"),
    path("members/<uuid:member_id>", views.MemberDetailView.as_view(), name="member-detail"),
    path("api-keys", views.ApiKeyListView.as_view(), name="api-key-list"),
    path("api-keys/<uuid:api_key_id>", views.ApiKeyDetailView.as_view(), name="api-key-detail"),
]
