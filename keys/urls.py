from django.urls import URLPattern, URLResolver

app_name = "keys"
urlpatterns: list[URLPattern | URLResolver] = []
