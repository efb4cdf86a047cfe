from django.urls import URLPattern, URLResolver

app_name = "keys_api"
urlpatterns: list[URLPattern | URLResolver] = []
