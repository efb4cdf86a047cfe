"""A long-running process's startup objects, kept out of the cyclic garbage collector's walks.

What a server or a worker builds while it starts (modules, classes, functions, Django's settings, models' metadata,
URL patterns, DRF's and the ORM's caches: about 140,000 objects in a web process) lives until the process exits,
yet every full collection walked all of it: about 100 ms with the GIL held, every few hundred requests, a stall that
every request in flight waited out. ``gc.freeze`` moves them to a generation the collector never walks (a full
collection then takes 11-16 ms); what the process creates afterwards is collected as before. Measured in the README
(Performance: "A process freezes what it starts with").
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Collect the startup's own garbage (what is frozen is never collected), then freeze what is left
    (``gc.get_freeze_count`` says how much). Call once the process has loaded what it serves with, before it
    serves."""
    gc.collect()
    gc.freeze()
