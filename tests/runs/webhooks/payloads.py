"""GitHub webhook payloads shaped like the documented examples (docs.github.com "Webhook events and payloads":
``ping``, ``issues`` action ``labeled``, ``issue_comment`` action ``created``), trimmed of URL fields nobody reads but
keeping every field the hook or GitHub's own schema relies on. Serialized the way GitHub sends them: compact JSON."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

OWNER_ID = 6811672
REPO_ID = 186853002


def _user(login: str, user_id: int, kind: str = "User") -> dict[str, Any]:
    return {
        "login": login,
        "id": user_id,
        "node_id": "MDQ6VXNlcjIxMDMxMDY3",
        "avatar_url": f"https://avatars.githubusercontent.com/u/{user_id}?v=4",
        "gravatar_id": "",
        "url": f"https://api.github.com/users/{login}",
        "html_url": f"https://github.com/{login}",
        "type": kind,
        "site_admin": False,
    }


def repository(full_name: str) -> dict[str, Any]:
    owner, name = full_name.split("/")
    return {
        "id": REPO_ID,
        "node_id": "MDEwOlJlcG9zaXRvcnkxODY4NTMwMDI=",
        "name": name,
        "full_name": full_name,
        "private": False,
        "owner": _user(owner, OWNER_ID, "Organization"),
        "html_url": f"https://github.com/{full_name}",
        "description": None,
        "fork": False,
        "url": f"https://api.github.com/repos/{full_name}",
        "created_at": "2019-05-15T15:19:25Z",
        "updated_at": "2019-05-15T15:21:03Z",
        "pushed_at": "2019-05-15T15:20:57Z",
        "default_branch": "main",
        "visibility": "public",
    }


def ping(full_name: str, *, hook_id: int = 109948940) -> dict[str, Any]:
    return {
        "zen": "Keep it logically awesome.",
        "hook_id": hook_id,
        "hook": {
            "type": "Repository",
            "id": hook_id,
            "name": "web",
            "active": True,
            "events": ["issue_comment", "issues"],
            "config": {
                "content_type": "json",
                "insecure_ssl": "0",
                "url": "https://cesaflow.example/hooks/github/…/",
            },
            "updated_at": "2019-05-15T15:21:03Z",
            "created_at": "2019-05-15T15:21:03Z",
            "url": f"https://api.github.com/repos/{full_name}/hooks/{hook_id}",
            "test_url": f"https://api.github.com/repos/{full_name}/hooks/{hook_id}/test",
            "ping_url": f"https://api.github.com/repos/{full_name}/hooks/{hook_id}/pings",
            "deliveries_url": f"https://api.github.com/repos/{full_name}/hooks/{hook_id}/deliveries",
            "last_response": {"code": None, "status": "unused", "message": None},
        },
        "repository": repository(full_name),
        "sender": _user("octocat", 21031067),
    }


def _issue(full_name: str, *, number: int, title: str, body: str | None, labels: list[str]) -> dict[str, Any]:
    return {
        "url": f"https://api.github.com/repos/{full_name}/issues/{number}",
        "html_url": f"https://github.com/{full_name}/issues/{number}",
        "id": 444500041,
        "node_id": "MDU6SXNzdWU0NDQ1MDAwNDE=",
        "number": number,
        "title": title,
        "user": _user("octocat", 21031067),
        "labels": [{"id": 1362934389, "name": name, "color": "d73a4a", "default": False} for name in labels],
        "state": "open",
        "locked": False,
        "assignee": None,
        "assignees": [],
        "milestone": None,
        "comments": 0,
        "created_at": "2019-05-15T15:20:18Z",
        # When it was labelled or commented on: now, as in a live delivery (older ones are refused as replays).
        "updated_at": _now(),
        "closed_at": None,
        "author_association": "OWNER",
        "body": body,
    }


def issues_labeled(
    full_name: str, *, label: str = "cesaflow", title: str = "Add a CSV export", body: str | None = "Per project."
) -> dict[str, Any]:
    return {
        "action": "labeled",
        "issue": _issue(full_name, number=1, title=title, body=body, labels=[label]),
        "label": {
            "id": 1362934389,
            "node_id": "MDU6TGFiZWwxMzYyOTM0Mzg5",
            "url": f"https://api.github.com/repos/{full_name}/labels/{label}",
            "name": label,
            "color": "d73a4a",
            "default": False,
            "description": None,
        },
        "repository": repository(full_name),
        "sender": _user("octocat", 21031067),
    }


def issue_comment_created(
    full_name: str, *, body: str = "/cesaflow Fix the failing test", association: str = "COLLABORATOR"
) -> dict[str, Any]:
    return {
        "action": "created",
        "issue": _issue(
            full_name, number=1, title="Spelling error in the README file", body="It says 'CesaFlwo'.", labels=[]
        ),
        "comment": {
            "url": f"https://api.github.com/repos/{full_name}/issues/comments/492700400",
            "html_url": f"https://github.com/{full_name}/issues/1#issuecomment-492700400",
            "issue_url": f"https://api.github.com/repos/{full_name}/issues/1",
            "id": 492700400,
            "node_id": "MDEyOklzc3VlQ29tbWVudDQ5MjcwMDQwMA==",
            "user": _user("hubot", 583231),
            "created_at": _now(),
            "updated_at": _now(),
            "author_association": association,
            "body": body,
        },
        "repository": repository(full_name),
        "sender": _user("hubot", 583231),
    }


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def encode(payload: dict[str, Any]) -> bytes:
    """The bytes GitHub sends: compact JSON, UTF-8, key order as built."""
    return json.dumps(payload, separators=(",", ":")).encode()
