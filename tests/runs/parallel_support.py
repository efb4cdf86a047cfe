"""Work released in many threads at the same instant, against the real test database (this module holds no tests).

Each thread takes a connection of its own from the pool, so a test that uses these grows the pool; ``fresh_pool``
puts it back to its resting size afterwards. An idle pooled connection left behind costs a later test: when a
module's clean-up terminates the test database's other backends (``proxy_support.serving``), every dead connection
still in the pool makes the next checkout retry with back-off.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from django.core.exceptions import ValidationError
from django.db import connection, connections
from django.db.backends.postgresql.base import DatabaseWrapper


def in_parallel(*works: Callable[[], object]) -> list[str]:
    """Each of ``works`` in a thread of its own, all released together; what each got: ``"ok"`` or the code of the
    ``ValidationError`` it raised (in the order they finished)."""
    barrier = threading.Barrier(len(works))
    outcomes: list[str] = []

    def one(work: Callable[[], object]) -> None:
        try:
            barrier.wait(10)
            work()
            outcomes.append("ok")
        except ValidationError as exc:
            outcomes.append(str(exc.code))
        finally:
            connection.close()  # back to the pool

    threads = [threading.Thread(target=one, args=(work,)) for work in works]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


@pytest.fixture
def fresh_pool(transactional_db: None) -> Iterator[None]:
    """The connection pool closed after the test (a new one opens on the next query), rid of what its threads grew."""
    yield
    wrapper = connections["default"]
    wrapper.close()
    if isinstance(wrapper, DatabaseWrapper):
        wrapper.close_pool()  # type: ignore[attr-defined]  # Django 5.1+; django-stubs lacks it
