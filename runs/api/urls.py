from django.urls import URLPattern, URLResolver

app_name = "runs_api"
urlpatterns: list[URLPattern | URLResolver] = []
