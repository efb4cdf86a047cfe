"""Inside the image: prove the agent command sandbox works there, and print what was found as one JSON line.

``python deploy/sandbox_check.py`` (run by deploy/image-smoke.sh with ``podman exec``) runs the configured mode's
self-test, then one agent command through ``run_command`` in a fresh workspace, and checks that it wrote its file,
cannot see the app's directory or the network, and has none of the server's environment. Exit 0 when all hold.
When the self-test fails, the output names the sandbox tool's error (README: the seccomp and /proc notes).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cesaflow.settings")

import django

django.setup()

from runs.workspaces.sandbox import run_command, sandbox_status  # noqa: E402
from runs.workspaces.storage import workspace_create, workspace_delete  # noqa: E402

# Each line prints a marker only when the sandbox holds: the file round-trips, /app is absent, the network is
# unreachable, and the environment has no CESAFLOW_* or DATABASE_URL.
COMMAND = (
    "echo sandboxed > note.txt && cat note.txt; "
    "test -e /app || echo app-hidden; "
    "python3 -c 'import socket; socket.create_connection((\"10.0.0.1\", 80), timeout=2)' 2>/dev/null "
    "|| echo no-network; "
    "env | grep -qE '^(CESAFLOW_|DATABASE_URL|REDIS_URL)' || echo env-clean"
)
EXPECTED = ("sandboxed", "app-hidden", "no-network", "env-clean")


def main() -> int:
    status = sandbox_status(refresh=True)
    report: dict[str, object] = {"mode": status.mode, "self_test": status.ok, "detail": status.detail}
    if status.ok:
        run_id = uuid.uuid4()
        root = workspace_create(run_id)
        try:
            result = asyncio.run(run_command(root, COMMAND, timeout_s=30))
        finally:
            workspace_delete(run_id)
        lines = result.output.split()
        report.update(exit_code=result.exit_code, checks={marker: marker in lines for marker in EXPECTED})
    print(json.dumps(report, sort_keys=True))
    checks = report.get("checks")
    return 0 if isinstance(checks, dict) and all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
