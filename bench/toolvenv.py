"""Throwaway virtualenvs under ``var/``: the tools the benchmark measures against or with (LiteLLM, py-spy), and
the one the servers under test run from (``bench.servers``: the project's production dependencies).

The tools are never project dependencies (nothing in ``requirements*.txt``). Each virtualenv is made on first use
with the base interpreter of the project's venv, at pinned versions, and reused while its marker file names the same
requirement. When it cannot be made (no registry, pip fails, the install takes longer than ``timeout_s``)
``Unavailable`` says why, and the caller reports it as left out (or falls back) instead of failing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class Unavailable(Exception):
    """The tool cannot be used in this run; the message says why (it goes to the report's notes and the JSON)."""


def _pip_env() -> dict[str, str]:
    # The registry settings (PIP_* variables) stay; nothing of the benchmark's own Python path leaks in.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def ensure(
    venv: Path,
    requirement: str,
    command: str,
    *,
    timeout_s: float,
    verify: Callable[[Path], str | None] | None = None,
    installs: Sequence[Sequence[str]] | None = None,
) -> tuple[Path, str]:
    """The venv's ``command`` executable with ``requirement`` installed, and how it got there ("reused" or
    "installed in N s"). ``verify(venv)`` may refuse a fresh install (returns the reason; the venv is deleted).
    ``installs``: the ``pip install`` arguments of each install step, in order, when ``requirement`` is not one
    pip requirement but names what they install (the marker compares it)."""
    executable = venv / "bin" / command
    marker = venv / "bench-requirement.txt"  # written once an install succeeded: what is in the venv
    try:
        if marker.read_text().strip() == requirement and executable.exists():
            return executable, "reused"
    except OSError:
        pass
    started = time.monotonic()
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    try:
        # The base interpreter of the project's venv: same Python version, none of the project's packages.
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120, env=_pip_env()
        )
        for arguments in installs or [[requirement]]:
            subprocess.run(
                [
                    str(venv / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--quiet",
                    *arguments,
                ],
                check=True,
                capture_output=True,
                timeout=timeout_s,
                env=_pip_env(),
            )
    except subprocess.TimeoutExpired:
        shutil.rmtree(venv, ignore_errors=True)
        raise Unavailable(f"pip install {requirement} took longer than {timeout_s:.0f} s") from None
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(venv, ignore_errors=True)
        detail = getattr(exc, "stderr", b"") or b""
        lines = [line for line in detail.decode(errors="replace").splitlines() if line.strip()]
        reason = lines[-1][:200] if lines else str(exc)[:200]
        raise Unavailable(f"pip install {requirement} failed: {reason}") from None
    refused = verify(venv) if verify is not None else None
    if refused is not None:
        shutil.rmtree(venv, ignore_errors=True)
        raise Unavailable(refused)
    if not executable.exists():
        raise Unavailable(f"{requirement} installed no {command!r} command")
    marker.write_text(requirement + "\n")
    return executable, f"installed in {time.monotonic() - started:.0f} s"
