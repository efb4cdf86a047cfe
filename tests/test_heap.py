"""A server process freezes what it starts with (``cesaflow.lib.heap``): importing the ASGI application, as every
server does, loads the URL patterns and their views, then moves the startup's objects out of the collector's walks;
garbage made afterwards is still collected.

In a subprocess on a fresh ``CESAFLOW_VAR_DIR``: freezing is process-wide, and this test process has long started.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.live_server import ROOT, fresh_clone_env

PROBE = """
import gc, sys, weakref
import cesaflow.asgi
frozen = gc.get_freeze_count()

class Node:
    pass

cycle = Node()
cycle.itself = cycle
gone = weakref.ref(cycle)
del cycle
gc.collect()
print(frozen, "runs.api.views" in sys.modules, gone() is None)
"""


def test_importing_the_application_freezes_the_startup_objects_and_later_garbage_is_still_collected(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=fresh_clone_env(CESAFLOW_VAR_DIR=str(tmp_path / "var")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    frozen, views_loaded, collected = done.stdout.split()
    assert int(frozen) > 50_000  # a web process starts with about 140,000 objects
    assert views_loaded == "True"  # the URL conf's views were loaded before the freeze, not by the first request
    assert collected == "True"
