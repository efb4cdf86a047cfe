from django.urls import URLPattern, URLResolver

app_name = "orgs_api"
urlpatterns: list[URLPattern | URLResolver] = []
