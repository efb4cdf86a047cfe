"""Dashboard URLs for accounts, organizations, the team and org API keys (namespace ``orgs``).

Objects are addressed by UUID; the org always comes from the session (``orgs.tenancy``), never from the URL.
"""

from django.urls import URLPattern, URLResolver, path

from orgs import views

app_name = "orgs"
urlpatterns: list[URLPattern | URLResolver] = [
    path("", views.HomeView.as_view(), name="home"),
    path("signup/", views.SignupView.as_view(), name="signup"),
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", views.LogoutView.as_view(), name="logout"),
    path("orgs/new/", views.OrgCreateView.as_view(), name="org_create"),
    path("orgs/switch/", views.OrgSwitchView.as_view(), name="org_switch"),
    path("settings/", views.SettingsView.as_view(), name="settings"),
    path("team/", views.TeamView.as_view(), name="team"),
    path("team/members/<uuid:membership_id>/role/", views.MemberRoleView.as_view(), name="member_role"),
    path("team/members/<uuid:membership_id>/remove/", views.MemberRemoveView.as_view(), name="member_remove"),
    path(
        "team/invitations/<uuid:invitation_id>/revoke/",
        views.InvitationRevokeView.as_view(),
        name="invitation_revoke",
    ),
    path("invite/<str:token>/", views.InviteAcceptView.as_view(), name="invite_accept"),
    path("api-keys/", views.ApiKeysView.as_view(), name="api_keys"),
    path("api-keys/<uuid:api_key_id>/revoke/", views.ApiKeyRevokeView.as_view(), name="api_key_revoke"),
]
