"""Failed-login rate limiting: a temporary lock per account and per client IP, kept in the cache.

* Failures are counted per account (the email typed, whether or not such an account exists, so a lock tells an
  attacker nothing) and per client IP, in a window of ``LOGIN_LOCKOUT_SECONDS`` from the first failure.
* Reaching ``LOGIN_FAILURE_LIMIT_ACCOUNT`` / ``LOGIN_FAILURE_LIMIT_IP`` locks that account or that IP (for every
  account) for ``LOGIN_LOCKOUT_SECONDS``. While locked, attempts are refused before the password is checked, so
  the right password does not help a guesser.
* An account lock refuses the addresses that failed against that account; an address with no failures against
  it still gets its attempt checked. Otherwise anyone could lock any user out from anywhere, indefinitely, with
  five wrong passwords every quarter of an hour (security.md T22). An IP lock likewise never blocks the same
  account from another IP.
* ``orgs.signals.login_locked_out`` is sent once per lock (``cache.add`` succeeds for exactly one caller), and the
  audit trail records it.
* ``namespace`` keeps another front door's counters and locks apart (Nexus operators: ``NEXUS``). Only the
  dashboard's namespace sends the signal; other callers see ``Lockout.fresh`` and record the lock themselves.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, replace

from django.conf import settings
from django.core.cache import cache

from orgs import signals
from orgs.models import User

ACCOUNT = "account"
IP = "ip"
# Key namespaces: the dashboard's (its keys predate namespaces) and Nexus's operators'.
DASHBOARD = "login-guard"
NEXUS = "nexus-login-guard"


@dataclass(frozen=True)
class Lockout:
    scope: str  # ACCOUNT or IP
    retry_after: int  # seconds until the lock lifts
    fresh: bool = False  # this very failure set a lock (reported once per lock)

    @property
    def retry_after_minutes(self) -> int:
        return max(1, math.ceil(self.retry_after / 60))


def _normalize_email(email: str) -> str:
    return email.strip().lower()


def _subject_key(kind: str, scope: str, value: str, namespace: str = DASHBOARD) -> str:
    # Hashed: cache keys stay short and bounded, and Redis does not collect a list of typed email addresses.
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{namespace}:{kind}:{scope}:{digest}"


def _subjects(email: str, ip: str | None) -> list[tuple[str, str, int]]:
    subjects = [(ACCOUNT, _normalize_email(email), settings.LOGIN_FAILURE_LIMIT_ACCOUNT)]
    if ip:
        subjects.append((IP, ip, settings.LOGIN_FAILURE_LIMIT_IP))
    return subjects


def _active_lock(scope: str, value: str, namespace: str) -> Lockout | None:
    until = cache.get(_subject_key("lock", scope, value, namespace))
    if until is None:
        return None
    remaining = math.ceil(float(until) - time.time())
    return Lockout(scope=scope, retry_after=max(1, remaining))


def _account_ip(email: str, ip: str | None) -> str:
    return f"{_normalize_email(email)}|{ip or '-'}"


def login_lockout(*, email: str, ip: str | None, namespace: str = DASHBOARD) -> Lockout | None:
    """The lock that refuses this attempt, if any (checked before the password is)."""
    for scope, value, _limit in _subjects(email, ip):
        lock = _active_lock(scope, value, namespace)
        if lock is None:
            continue
        if scope == ACCOUNT and not cache.get(_subject_key("fail", "account-ip", _account_ip(email, ip), namespace)):
            continue  # this address never failed against the account: let its password be checked
        return lock
    return None


def _count_failure(scope: str, value: str, namespace: str) -> int:
    key = _subject_key("fail", scope, value, namespace)
    window = settings.LOGIN_LOCKOUT_SECONDS
    if cache.add(key, 1, timeout=window):
        return 1
    try:
        return cache.incr(key)  # atomic; keeps the window's expiry
    except ValueError:  # the window expired between add() and incr(): this failure starts a new one
        cache.set(key, 1, timeout=window)
        return 1


def login_failure_record(*, email: str, ip: str | None, namespace: str = DASHBOARD) -> Lockout | None:
    """Count one failed attempt; returns the lock this failure caused (or that is already in place), if any."""
    lockout: Lockout | None = None
    fresh = False
    seconds = settings.LOGIN_LOCKOUT_SECONDS
    # Which addresses failed against this account; kept for two lock periods so it outlives any lock it causes.
    account_ip_key = _subject_key("fail", "account-ip", _account_ip(email, ip), namespace)
    if not cache.add(account_ip_key, 1, timeout=2 * seconds):
        cache.touch(account_ip_key, timeout=2 * seconds)
    for scope, value, limit in _subjects(email, ip):
        if _count_failure(scope, value, namespace) < limit:
            continue
        lock_key = _subject_key("lock", scope, value, namespace)
        if cache.add(lock_key, time.time() + seconds, timeout=seconds):
            # A fresh lock: the counter restarts when it lifts, and the lock is reported exactly once.
            cache.delete(_subject_key("fail", scope, value, namespace))
            fresh = True
            if namespace == DASHBOARD:
                signals.login_locked_out.send(
                    sender=User, org=None, actor=None, email=_normalize_email(email)[:254], scope=scope
                )
        lockout = lockout or _active_lock(scope, value, namespace)
    if lockout is not None and fresh:
        lockout = replace(lockout, fresh=True)
    return lockout


def login_success_record(*, email: str, namespace: str = DASHBOARD) -> None:
    """A correct password clears the account's failures. The IP's count stays: an attacker holding one valid
    account must not be able to reset the per-IP budget between guesses at other accounts."""
    cache.delete(_subject_key("fail", ACCOUNT, _normalize_email(email), namespace))


def account_lock_clear(*, email: str, namespace: str = DASHBOARD) -> bool:
    """Lifts the account lock of ``email`` and restarts its failure count; True if it was locked."""
    normalized = _normalize_email(email)
    lock_key = _subject_key("lock", ACCOUNT, normalized, namespace)
    was_locked = cache.get(lock_key) is not None
    cache.delete_many([lock_key, _subject_key("fail", ACCOUNT, normalized, namespace)])
    return was_locked
