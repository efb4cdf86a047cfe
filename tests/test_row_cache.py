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


def test_held_gives_the_generation_and_fresh_rows_of_an_entry_whatever_the_current_one():
    cache = RowCache(ttl_s=10.0, max_entries=4)
    try:
        cache.remember("a", [Organization(name="o")], token="generation-1")
        held = cache.held("a")
        assert held is not None
        generation, rows = held
        assert generation == "generation-1"  # the caller compares it with the generation it reads
        assert [row.name for row in rows] == ["o"]
        rows[0].name = "changed by a request"
        again = cache.held("a")
        assert again is not None
        assert again[1][0].name == "o"  # each call builds its own instances
        assert cache.held("b") is None
        entry = cache.entries["a"]
        cache.entries["a"] = dataclasses.replace(entry, cached_at=entry.cached_at - 11.0)
        assert cache.held("a") is None  # past its time, whatever the generation
    finally:
        RowCache.instances.remove(cache)
