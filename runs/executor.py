"""Hands queued runs to whatever executes them (inline asyncio task or ``run_worker`` processes)."""

from __future__ import annotations

import uuid


def submit(run_id: uuid.UUID) -> None:
    """Called after the run's row is committed."""
    # Execution arrives with the executor; until then a queued run simply waits.
