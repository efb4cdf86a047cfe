"""The virtualenv the servers under test run from: the project's production dependencies only.

CesaFlow's servers, ``run_worker`` and the floor run from ``var/bench-servers/``: ``requirements.lock`` (what the
container image installs, hashes checked) plus uvicorn, the second server measured, and click, which it needs, at the
development lock's pins. Not from the development virtualenv: httpx imports its command-line client and DRF its
optional helpers whenever their packages are installed, and the test tools there bring them (schemathesis: requests
and rich; pytest: pygments): about 210 modules and 10 MB of resident memory a production process does not have (1,782
modules and 116 MB against 1,570 and 106 MB once the application is imported, 2026-12-02). Installed on first use and
reused while ``requirements.lock`` and those two pins are unchanged; when it cannot be installed the development
virtualenv serves, and the report says so (``bench.toolvenv.Unavailable``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from bench import toolvenv
from bench.harness import BIN

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "var" / "bench-servers"
LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
# Beside the production lock: uvicorn and what it needs that the lock does not hold (h11 it does).
EXTRAS = ("uvicorn", "click")
INSTALL_TIMEOUT_S = 600.0


def _pinned(name: str) -> str:
    """``name==version`` as the development lock pins it."""
    found = re.search(rf"^{re.escape(name)}==(\S+)", DEV_LOCK.read_text(), flags=re.MULTILINE)
    if found is None:
        raise toolvenv.Unavailable(f"{name} is not pinned in {DEV_LOCK.name}")
    return f"{name}=={found.group(1)}"


def ensure_installed() -> tuple[Path, str]:
    """The servers' ``bin`` directory and how it got there ("reused" or "installed in N s")."""
    extras = [_pinned(name) for name in EXTRAS]
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    requirement = f"requirements.lock sha256:{digest} + {' '.join(extras)}"
    installs = [["--require-hashes", "-r", str(LOCK)], ["--no-deps", *extras]]
    python, how = toolvenv.ensure(VENV, requirement, "python", timeout_s=INSTALL_TIMEOUT_S, installs=installs)
    return python.parent, how


def installed_or_development(say: Callable[[str], None]) -> tuple[Path, dict[str, str]]:
    """The ``bin`` directory the servers run from, and what the report says of it: the development virtualenv's
    when this one cannot be installed."""
    say(f"the servers' virtualenv {VENV} (production dependencies, installed on first use)")
    try:
        server_bin, how = ensure_installed()
    except toolvenv.Unavailable as exc:
        say(f"  unavailable ({exc}): the servers run from the development virtualenv")
        return BIN, {"venv": str(BIN.parent), "unavailable": str(exc)}
    return server_bin, {"venv": str(VENV), "install": how}


def note(info: dict[str, str]) -> str:
    """The report's line on where the servers ran from."""
    if "unavailable" in info:
        return (
            f"- servers: ran from the development virtualenv ({info['unavailable']}); its test tools add about 10 MB "
            "to each server's RSS (bench/servers.py)"
        )
    return f"- servers: production dependencies in {info['venv']} ({info['install']})"
