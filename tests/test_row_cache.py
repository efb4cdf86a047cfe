"""``cesaflow.lib.row_cache.RowCache``: what a kept entry answers, and for how long."""

from __future__ import annotations

import dataclasses

from cesaflow.lib.row_cache import RowCache
from orgs.models import Organization


def test_holds_answers_for_a_fresh_entry_of_any_generation_and_not_past_its_time():
    cache = RowCache(ttl_s=10.0, max_entries=4)
    try:
        cache.remember("a", [Organization(name="o")], token="generation-1")
        assert cache.holds("a")
        assert not cache.holds("b")
        assert cache.recall("a", token="generation-2") is None  # its rows are not trusted under another generation
        assert cache.holds("a")  # but that it was kept is still true
        entry = cache.entries["a"]
        cache.entries["a"] = dataclasses.replace(entry, cached_at=entry.cached_at - 11.0)
        assert not cache.holds("a")
    finally:
        RowCache.instances.remove(cache)
