"""The canary scanner (security.md §7.2): collect everything the app wrote (database dump, PostgreSQL data files
and WAL, Redis, logs, media/workspace roots) and search it for a canary secret in every encoding it could have
been written in. Shared by the vault's canary tests; later flows (runs, webhooks) can reuse it.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import secrets
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import redis
from django.conf import settings
from django.db import connection

PG_DUMP = "/usr/bin/pg_dump"


def new_canary(prefix: str = "sk-proj-CANARY") -> str:
    """A fresh provider-key-shaped canary, long enough (>= 24 bytes) for the base64 alignments to be distinctive."""
    return f"{prefix}{secrets.token_hex(20)}"


def encodings(value: str) -> dict[str, bytes]:
    """The forms a leaked value could take on disk or in a log: raw, UTF-16LE, JSON-escaped, URL-encoded, hex, and
    base64/base64url at the three byte alignments (only the full 3-byte groups, which do not depend on the bytes
    around the value)."""
    raw = value.encode()
    forms: dict[str, bytes] = {
        "raw": raw,
        "utf-16le": value.encode("utf-16-le"),
        "json": json.dumps(value)[1:-1].encode(),
        "url": quote(value, safe="").encode(),
        "url-plus": quote_plus(value).encode(),
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
    }
    for offset in range(3):
        chunk = raw[offset:]
        chunk = chunk[: len(chunk) // 3 * 3]
        forms[f"base64@{offset}"] = base64.b64encode(chunk)
        forms[f"base64url@{offset}"] = base64.urlsafe_b64encode(chunk)
    return forms


@dataclass(frozen=True)
class Hit:
    source: str
    form: str


@dataclass
class Collected:
    """Named blobs to search, and the sources that could not be read (reported, never silently dropped)."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def add(self, source: str, data: bytes) -> None:
        self.blobs[source] = self.blobs.get(source, b"") + data


def scan(collected: Collected, canaries: Iterable[str]) -> list[Hit]:
    hits = []
    for canary in canaries:
        forms = encodings(canary)
        for source, blob in collected.blobs.items():
            for form, needle in forms.items():
                if needle in blob:
                    hits.append(Hit(source, form))
    return hits


# --- Collectors ---------------------------------------------------------------------------------------------------


def _libpq_env() -> dict[str, str]:
    db = connection.settings_dict
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for key, name in (("HOST", "PGHOST"), ("PORT", "PGPORT"), ("USER", "PGUSER"), ("PASSWORD", "PGPASSWORD")):
        if db.get(key):
            env[name] = str(db[key])
    env["PGDATABASE"] = str(db["NAME"])
    return env


def collect_pg_dump(collected: Collected) -> None:
    """``pg_dump --format=plain`` of the database the tests use (committed data only: use transaction=True)."""
    result = subprocess.run(
        [PG_DUMP, "--format=plain", "--no-owner", "--no-privileges"],
        env=_libpq_env(),
        capture_output=True,
        check=True,
        timeout=120,
    )
    collected.add("pg_dump", result.stdout)


def collect_pg_files(collected: Collected) -> None:
    """After a CHECKPOINT, the WAL and this database's heap files, if the server's data directory is readable here
    (a local server and a superuser connection); otherwise recorded as unavailable."""
    with connection.cursor() as cursor:
        try:
            cursor.execute("CHECKPOINT")
            cursor.execute("SELECT current_setting('data_directory')")
            data_dir = Path(cursor.fetchone()[0])
            cursor.execute("SELECT oid FROM pg_database WHERE datname = current_database()")
            db_oid = cursor.fetchone()[0]
        except Exception as exc:  # not a superuser, or not PostgreSQL
            collected.unavailable["pg_files"] = f"{type(exc).__name__}"
            return
    directories = [data_dir / "pg_wal", data_dir / "base" / str(db_oid)]
    if not all(d.is_dir() and os.access(d, os.R_OK) for d in directories):
        collected.unavailable["pg_files"] = f"{data_dir} is not readable from the test process"
        return
    for directory in directories:
        for path in sorted(directory.iterdir()):
            if path.is_file():
                collected.add(f"pg_files:{directory.name}", path.read_bytes())


def collect_redis(collected: Collected) -> None:
    """Every key of the Redis database in use: its name, its DUMP, and its value read by type (DUMP may compress)."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        for key in client.scan_iter(count=500):
            collected.add("redis:keys", key + b"\n")
            dumped = client.dump(key)
            if dumped:
                collected.add("redis:dump", dumped)
            kind = client.type(key)
            parts: list[Any] = []
            if kind == b"string":
                parts = [client.get(key)]
            elif kind == b"hash":
                parts = [b for kv in client.hgetall(key).items() for b in kv]
            elif kind == b"list":
                parts = list(client.lrange(key, 0, -1))
            elif kind == b"set":
                parts = list(client.smembers(key))
            elif kind == b"zset":
                parts = list(client.zrange(key, 0, -1))
            elif kind == b"stream":
                parts = [repr(entry) for entry in client.xrange(key) or []]
            for part in parts:
                data = part if isinstance(part, bytes) else str(part).encode()
                collected.add("redis:values", data + b"\n")
    finally:
        client.close()


def collect_directories(collected: Collected) -> None:
    """Media and workspace roots, when the project has them."""
    for name in ("MEDIA_ROOT", "WORKSPACE_ROOT"):
        root = getattr(settings, name, "")
        if not root or not Path(root).is_dir():
            continue
        for path in Path(root).rglob("*"):
            if path.is_file():
                collected.add(f"dir:{name}", path.read_bytes())


# --- Log capture ----------------------------------------------------------------------------------------------


class _RawHandler(logging.Handler):
    """Keeps every record's text as emitted, before any handler's redaction filter rewrites it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + record.stack_info
        self.lines.append(f"{record.name} {record.levelname} {text}")


@dataclass
class LogCapture:
    raw: _RawHandler
    configured: list[tuple[logging.StreamHandler[Any], Any]]  # the project's handlers, their original streams
    buffers: list[io.StringIO]

    def text(self) -> bytes:
        """Unredacted record text (the first line of defence must hold on its own) and what the configured
        handlers actually wrote."""
        written = "".join(buffer.getvalue() for buffer in self.buffers)
        return ("\n".join(self.raw.lines) + "\n" + written).encode()


@contextmanager
def debug_logging() -> Iterator[LogCapture]:
    """Every logger at DEBUG (the worst case), a raw capture at the front of the root handlers, and the project's
    own stream handlers redirected into buffers. Everything is restored afterwards."""
    root = logging.getLogger()
    raw = _RawHandler()
    loggers = [lg for lg in list(root.manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    saved_levels = {lg: lg.level for lg in loggers}
    saved_root = root.level
    configured: list[tuple[logging.StreamHandler[Any], Any]] = []
    buffers: list[io.StringIO] = []
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler) and type(handler) is logging.StreamHandler:
            buffer = io.StringIO()
            configured.append((handler, handler.setStream(buffer)))
            buffers.append(buffer)
    root.handlers.insert(0, raw)
    root.setLevel(logging.DEBUG)
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    try:
        yield LogCapture(raw=raw, configured=configured, buffers=buffers)
    finally:
        root.removeHandler(raw)
        root.setLevel(saved_root)
        for lg, level in saved_levels.items():
            lg.setLevel(level)
        for handler, stream in configured:
            handler.setStream(stream)
