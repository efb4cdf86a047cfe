"""Dashboard URLs for accounts, organizations, the team and org API keys (namespace ``orgs``).

Objects are addressed by UUID; the org always comes from the session (``orgs.tenancy``), never from the URL.
"""

from django.urls import URLPattern, URLResolver, path

from orgs import session_views, views

app_name = "orgs"
urlpatterns: list[URLPattern | URLResolver] = [
    path("", views.HomeView.as_view(), name="home"),
    path("signup/", views.SignupView.as_view(), name="signup"),
    path("signup/confirm/<str:token>/", views.SignupConfirmView.as_view(), name="signup_confirm"),
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", views.LogoutView.as_view(), name="logout"),
    path("account/sessions/", session_views.SessionsView.as_view(), name="sessions"),
    path("account/sessions/<str:key>/revoke/", session_views.SessionRevokeView.as_view(), name="session_revoke"),
    path(
        "account/sessions/sign-out-everywhere/",
        session_views.SignOutEverywhereView.as_view(),
        name="sign_out_everywhere",
    ),
    path("account/password/", session_views.PasswordChangeView.as_view(), name="password_change"),
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
