"""The hash-locked requirements (``make lock``) agree with the human-edited pins, so they cannot drift apart.

``requirements.txt`` / ``requirements-dev.txt`` hold the pins people edit; ``requirements.lock`` /
``requirements-dev.lock`` hold every transitive dependency with the hashes of its files, and are what ``make install``
/ ``make install-dev`` and the deployment install with ``pip install --require-hashes``.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
_LOCK_ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+?)(?:\s*\\)?$")


def top_level(path: Path) -> list[Requirement]:
    """The requirement lines of a human-edited file (comments and ``-r`` includes left out)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) for each entry of a lock file."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current = ""
    for line in path.read_text().splitlines():
        match = _LOCK_ENTRY.match(line)
        if match:
            current = canonicalize_name(match["name"])
            assert current not in entries, f"{path.name}: {current} twice"
            entries[current] = (match["version"], [])
        elif line.strip().startswith("--hash=") and current:
            entries[current][1].append(line.strip().removeprefix("--hash=").rstrip(" \\"))
        elif line.strip() and not line.lstrip().startswith("#"):
            pytest.fail(f"{path.name}: unexpected line {line!r} (an index URL or an unpinned requirement?)")
    return entries


RUNTIME = top_level(ROOT / "requirements.txt")
DEV = top_level(ROOT / "requirements-dev.txt")
RUNTIME_LOCK = locked(ROOT / "requirements.lock")
DEV_LOCK = locked(ROOT / "requirements-dev.lock")


@pytest.mark.parametrize(("pins", "lock"), [(RUNTIME, RUNTIME_LOCK), (RUNTIME + DEV, DEV_LOCK)], ids=["runtime", "dev"])
def test_every_top_level_pin_is_in_its_lock_at_the_same_version(pins, lock):
    for requirement in pins:
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1, f"{requirement}: top-level requirements are exact pins"
        assert specifiers[0].operator == "==", f"{requirement}: top-level requirements are exact pins"
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{name} is pinned but not locked: run `make lock`"
        assert lock[name][0] == specifiers[0].version, f"{name}: pinned {specifiers[0].version}, locked {lock[name][0]}"


@pytest.mark.parametrize(("pins", "lock"), [(RUNTIME, RUNTIME_LOCK), (RUNTIME + DEV, DEV_LOCK)], ids=["runtime", "dev"])
def test_the_extras_of_a_pin_are_locked_too(pins, lock):
    """``psycopg[binary]`` needs ``psycopg-binary`` in the lock (pip-compile writes extras as their packages)."""
    for requirement in (r for r in pins if r.extras):
        for extra in requirement.extras:
            for raw in importlib.metadata.requires(requirement.name) or []:
                needed = Requirement(raw)
                if needed.marker is not None and needed.marker.evaluate({"extra": extra}):
                    assert canonicalize_name(needed.name) in lock, f"{requirement}: {needed.name} not locked"


@pytest.mark.parametrize("lock", [RUNTIME_LOCK, DEV_LOCK], ids=["runtime", "dev"])
def test_every_locked_package_has_sha256_hashes(lock):
    assert lock
    for name, (_version, hashes) in lock.items():
        assert hashes, f"{name} has no hash: pip --require-hashes would refuse the whole install"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name


def test_the_runtime_lock_is_the_dev_lock_restricted_to_runtime():
    for name, (version, hashes) in RUNTIME_LOCK.items():
        assert name in DEV_LOCK, f"{name} is locked for runtime but missing from the dev lock"
        assert DEV_LOCK[name][0] == version, f"{name}: runtime {version}, dev {DEV_LOCK[name][0]}"
        assert set(hashes) == set(DEV_LOCK[name][1]), f"{name}: the two locks trust different files"
