from django.urls import URLPattern, path

from bench.floor import views

urlpatterns: list[URLPattern] = [
    path("healthz", views.healthz),
    path("api/v1/org", views.org),
    path("api/v1/chat/completions", views.chat_completions),
]
