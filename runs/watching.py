"""Starting to watch a run (the SSE stream and the websocket): one database hop once the watcher is subscribed.

The watcher subscribes to the run's group first (an event published meanwhile is queued, not missed), then this
hop checks the credentials once more (a revocation committed before the subscription was not heard), takes the
run's snapshot and attaches a run that waits for its watcher (start on attach), so the executor can start at once.
Each of these was a hop of its own; on the path to a run's first words every hop counts (issue #13).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from orgs.authentication import Principal, revalidate
from orgs.tenancy import OrgContext
from runs.models import Run
from runs.selectors import run_get_for_org
from runs.services import run_attach


@dataclass(frozen=True)
class WatchStart:
    refused: int | None  # the websocket close code when the credentials no longer hold (4401 / 4403)
    run: Run | None  # the snapshot (None: deleted meanwhile)


def watch_start(*, principal: Principal, context: OrgContext, run_id: uuid.UUID) -> WatchStart:
    """Sync (database and session store); raises ``SessionStoreUnavailable`` like ``revalidate``."""
    refused = revalidate(principal, context)
    if refused is not None:
        return WatchStart(refused=refused, run=None)
    run = run_get_for_org(org=context.org, run_id=run_id)
    if run is not None and not run.is_terminal and run.attached_at is None:
        run_attach(run=run)
    return WatchStart(refused=None, run=run)
