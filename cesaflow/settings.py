"""CesaFlow settings: the only module that reads the environment.

Two deployments (see README "Configuration"):

* development (default, ``CESAFLOW_ENV`` unset): works offline with no configuration. SQLite under ``var/``,
  local-memory cache, in-memory channel layer, and generated development secrets under ``var/`` (mode 0600).
  DEBUG only with ``CESAFLOW_DEBUG=true`` (``make run`` sets it).
  Setting ``DATABASE_URL`` / ``REDIS_URL`` switches to PostgreSQL / Redis (that is how the tests run).
* production (``CESAFLOW_ENV=production``): refuses to start unless every secret and service is configured.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from cesaflow.lib.derived import reuses_secret
from keys.crypto import Keyring, KeyringError

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("CESAFLOW_VAR_DIR", BASE_DIR / "var"))

ENV: str = os.environ.get("CESAFLOW_ENV", "development").strip().lower()
if ENV not in {"development", "production"}:
    raise ImproperlyConfigured("CESAFLOW_ENV must be 'development' or 'production'.")
PRODUCTION: bool = ENV == "production"


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), not {raw!r}.")


def _env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer.") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}.")
    return value


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _required(name: str) -> str:
    """A production secret or service address: missing means refusing to start, loudly."""
    value = os.environ.get(name, "").strip()
    if not value:
        raise ImproperlyConfigured(f"{name} is required when CESAFLOW_ENV=production (see README).")
    return value


_dev_warnings: list[str] = []


def _dev_secret(filename: str, make: Any, what: str) -> str:
    """Read or create a development-only secret under var/ with mode 0600."""
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    path = VAR_DIR / filename
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(make())
        _dev_warnings.append(f"generated a DEVELOPMENT {what} at {path}; never use it in production")
    return path.read_text().strip()


# --- Core -------------------------------------------------------------------------------------------

if PRODUCTION:
    SECRET_KEY = _required("CESAFLOW_SECRET_KEY")
    if _env_bool("CESAFLOW_DEBUG", False):
        raise ImproperlyConfigured("CESAFLOW_DEBUG is for development only; unset it when CESAFLOW_ENV=production.")
    DEBUG = False
    ALLOWED_HOSTS = _env_list("CESAFLOW_ALLOWED_HOSTS")
    if not ALLOWED_HOSTS:
        raise ImproperlyConfigured("CESAFLOW_ALLOWED_HOSTS is required when CESAFLOW_ENV=production.")
else:
    SECRET_KEY = os.environ.get("CESAFLOW_SECRET_KEY") or _dev_secret(
        "secret_key", lambda: secrets.token_urlsafe(50), "Django secret key"
    )
    # Only when asked for (`make run` does): a development deployment reachable by others must not show tracebacks.
    DEBUG = _env_bool("CESAFLOW_DEBUG", False)
    ALLOWED_HOSTS = _env_list("CESAFLOW_ALLOWED_HOSTS") or ["127.0.0.1", "localhost", "[::1]", "testserver"]

SECRET_KEY_FALLBACKS = _env_list("CESAFLOW_SECRET_KEY_FALLBACKS")
CSRF_TRUSTED_ORIGINS = _env_list("CESAFLOW_CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "daphne",
    # Nexus (nexus.site) is an AdminSite with its own operator sessions; there is no default admin site.
    "django.contrib.admin.apps.SimpleAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "csp",
    "orgs",
    "keys",
    "runs",
    "nexus",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "cesaflow.lib.middleware.SecurityHeadersMiddleware",
    "cesaflow.lib.middleware.MethodNotAllowedPageMiddleware",
    # Session tokens (orgs.sessions): sets request.user from the JWT cookie after checking its session in Redis.
    "orgs.sessions.middleware.SessionTokenMiddleware",
    # Nexus's own operator sessions on /<NEXUS_PREFIX>/ (the dashboard's session is ignored there).
    "nexus.middleware.NexusSessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    # Deny by default: every dashboard view needs a login unless decorated with @login_not_required.
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    "cesaflow.lib.middleware.RequestContextMiddleware",
]

# LoginRequiredMiddleware and the admin look for Django's session and authentication middleware; the dashboard's
# SessionTokenMiddleware and Nexus's own operator sessions play those roles (request.user is set before any view),
# so the checks' premise holds. tests/test_settings.py asserts the order.
SILENCED_SYSTEM_CHECKS = ["auth.E013", "admin.E408", "admin.E410"]

ROOT_URLCONF = "cesaflow.urls"
ASGI_APPLICATION = "cesaflow.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "csp.context_processors.nonce",
                "orgs.context_processors.current_org",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------------------------------

if PRODUCTION:
    _database_url = _required("DATABASE_URL")
    if not _database_url.startswith(("postgres://", "postgresql://")):
        raise ImproperlyConfigured("DATABASE_URL must be a PostgreSQL URL in production.")
else:
    _database_url = os.environ.get("DATABASE_URL", "").strip()

if _database_url.startswith(("postgres://", "postgresql://")):
    # A connection pool (psycopg_pool), not persistent connections: under ASGI every request runs its sync code
    # in a thread of its own, so CONN_MAX_AGE would keep one connection per past thread and a new one per request.
    # Django requires CONN_MAX_AGE = 0 with the pool; closing a connection hands it back. Health checks make a
    # pooled connection that died (a restarted server) get replaced on checkout; Django's backend with a check that
    # needs no round trip for a connection handed back within the second that the server has said nothing to since
    # (``cesaflow.lib.postgresql``).
    _pool_min = _env_int("CESAFLOW_DB_POOL_MIN", 2)
    _pool_max = _env_int("CESAFLOW_DB_POOL_MAX", 20, minimum=1)
    if _pool_min > _pool_max:
        raise ImproperlyConfigured("CESAFLOW_DB_POOL_MIN must not exceed CESAFLOW_DB_POOL_MAX.")
    DATABASES = {
        "default": dj_database_url.parse(
            _database_url, conn_max_age=0, conn_health_checks=True, engine="cesaflow.lib.postgresql"
        )
    }
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": _pool_min,
        "max_size": _pool_max,
        # Seconds a request waits for a free connection before failing, rather than hanging forever.
        "timeout": _env_int("CESAFLOW_DB_POOL_TIMEOUT", 10, minimum=1),
    }
elif _database_url:
    DATABASES = {
        "default": dj_database_url.parse(
            _database_url, conn_max_age=_env_int("CESAFLOW_DB_CONN_MAX_AGE", 60), conn_health_checks=True
        )
    }
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(VAR_DIR / "cesaflow.sqlite3")}}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # One process writes from several threads (requests, the gateway's run ends, the inline executor). SQLite's
    # default deferred transactions fail at once with "database is locked" when two that have read both want to write
    # (neither can wait for the other); IMMEDIATE takes the write lock at BEGIN, so writers queue for up to
    # ``timeout`` seconds instead, and WAL lets reads go on while one writes.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"transaction_mode": "IMMEDIATE", "timeout": 20, "init_command": "PRAGMA journal_mode=WAL;"}
    )

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache, sessions, channel layer ----------------------------------------------------------

REDIS_URL = _required("REDIS_URL") if PRODUCTION else os.environ.get("REDIS_URL", "").strip()
# A dedicated key for channel-layer payload encryption (never SECRET_KEY): streamed model output passes
# through Redis, and Redis must not be able to hand it to disk or to anyone reading its memory.
CHANNEL_LAYER_KEY = (
    _required("CESAFLOW_CHANNEL_LAYER_KEY") if PRODUCTION else os.environ.get("CESAFLOW_CHANNEL_LAYER_KEY", "")
)
# Same as SECRET_KEY, one inside the other, or an obvious derivation of it (cesaflow/lib/derived.py says which).
if CHANNEL_LAYER_KEY and reuses_secret(CHANNEL_LAYER_KEY, [SECRET_KEY, *SECRET_KEY_FALLBACKS]):
    raise ImproperlyConfigured("CESAFLOW_CHANNEL_LAYER_KEY must not reuse or derive from CESAFLOW_SECRET_KEY.")
_cache_prefix = os.environ.get("CESAFLOW_CACHE_PREFIX", "cf")

if REDIS_URL:
    _redis_options = {
        "CLIENT_CLASS": "django_redis.client.DefaultClient",
        # One redis-py client and pool per alias settings in the process, not a client per request (cesaflow.lib).
        "CONNECTION_FACTORY": "cesaflow.lib.redis_clients.SharedClientConnectionFactory",
    }
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": _cache_prefix,
            # Rate limits, the authorization generation and the row caches ask it on every request: a Redis that
            # hangs (accepts, never answers) makes them fail open or fall back to the database after 5 s, instead
            # of holding each request forever (redis-py waits without limit by default).
            "OPTIONS": {**_redis_options, "SOCKET_CONNECT_TIMEOUT": 2, "SOCKET_TIMEOUT": 5},
        },
        # The session store (orgs.sessions.store) uses this alias's Redis connection. Short timeouts: every signed-in
        # request asks it, and when Redis is down those requests must fail closed quickly, not hang.
        "sessions": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": f"{_cache_prefix}:s",
            "OPTIONS": {**_redis_options, "SOCKET_CONNECT_TIMEOUT": 2, "SOCKET_TIMEOUT": 2},
        },
    }
    # channels_redis waits for messages with 5 s blocking pops; redis-py's default 5 s socket timeout would cut
    # every idle wait short with a TimeoutError (an idle websocket consumer dies). Reads get 15 s.
    _layer_config: dict[str, Any] = {
        "hosts": [{"address": REDIS_URL, "socket_timeout": 15}],
        "prefix": f"{_cache_prefix}:asgi",
    }
    if CHANNEL_LAYER_KEY:
        _layer_config["symmetric_encryption_keys"] = [CHANNEL_LAYER_KEY]
    # channels_redis's layer, with group sends that skip unsubscribed groups in one round trip (cesaflow.lib).
    CHANNEL_LAYERS = {"default": {"BACKEND": "cesaflow.lib.channel_layer.RedisChannelLayer", "CONFIG": _layer_config}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "cesaflow"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
# Where session records live: Redis whenever REDIS_URL is set (always in production), else this process's memory
# (the embedded default of `make run`: one process, sessions end when it stops).
SESSION_STORE = "redis" if REDIS_URL else "local"
SESSION_STORE_PREFIX = f"{_cache_prefix}:sess"
# Flash messages travel in a signed cookie: there is no server-side Django session any more.
MESSAGE_STORAGE = "django.contrib.messages.storage.cookie.CookieStorage"

# --- Provider-key keyring ---------------------------------------------------------------------------


def _generate_dev_keyring() -> str:
    return "1:" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


_keyring_source = (
    _required("CESAFLOW_KEYRING")
    if PRODUCTION
    else os.environ.get("CESAFLOW_KEYRING") or _dev_secret("dev-keyring", _generate_dev_keyring, "keyring")
)
try:
    KEYRING = Keyring.parse(_keyring_source, min_kid=_env_int("CESAFLOW_KEYRING_MIN_KID", 0))
except KeyringError as exc:
    raise ImproperlyConfigured(f"CESAFLOW_KEYRING is invalid: {exc}") from None
del _keyring_source
# The keyring must be independent of every other secret: a leaked SECRET_KEY must not open provider keys.
_derived = {
    form
    for secret in (SECRET_KEY, *SECRET_KEY_FALLBACKS)
    for form in (
        secret.encode()[:32],
        hashlib.sha256(secret.encode()).digest(),
        hashlib.sha512(secret.encode()).digest()[:32],
    )
}
if any(material in _derived for material in KEYRING.keys.values()):
    raise ImproperlyConfigured("CESAFLOW_KEYRING must not reuse or derive from CESAFLOW_SECRET_KEY.")

# --- Sessions: JWT access tokens checked against a session record in Redis (orgs.sessions) -------------------

# HS256 signing keys, "<kid>:<base64 32 bytes>,…" like the provider keyring (first = signs; the others still verify
# until their tokens have expired). Never SECRET_KEY, never the provider keyring.
_session_keys_source = (
    _required("CESAFLOW_SESSION_KEYS")
    if PRODUCTION
    else os.environ.get("CESAFLOW_SESSION_KEYS")
    or _dev_secret("dev-session-keys", _generate_dev_keyring, "session signing keyring")
)
try:
    SESSION_KEYRING = Keyring.parse(_session_keys_source, min_kid=_env_int("CESAFLOW_SESSION_KEYS_MIN_KID", 0))
except KeyringError as exc:
    raise ImproperlyConfigured(f"CESAFLOW_SESSION_KEYS is invalid: {exc}") from None
del _session_keys_source
if any(material in _derived or material in KEYRING.keys.values() for material in SESSION_KEYRING.keys.values()):
    raise ImproperlyConfigured(
        "CESAFLOW_SESSION_KEYS must not reuse or derive from CESAFLOW_SECRET_KEY or CESAFLOW_KEYRING."
    )
# An access token lives at most 15 minutes; the browser gets a new one silently while its session lives.
SESSION_TOKEN_SECONDS = _env_int("CESAFLOW_SESSION_TOKEN_SECONDS", 600, minimum=30)
if SESSION_TOKEN_SECONDS > 900:
    raise ImproperlyConfigured("CESAFLOW_SESSION_TOKEN_SECONDS must be at most 900 (15 minutes).")
# A session ends after this long without a request, and after this long at the latest, whatever the activity.
SESSION_IDLE_SECONDS = _env_int("CESAFLOW_SESSION_IDLE_SECONDS", 2 * 3600, minimum=60)
SESSION_ABSOLUTE_SECONDS = _env_int("CESAFLOW_SESSION_ABSOLUTE_SECONDS", 12 * 3600, minimum=300)
if SESSION_IDLE_SECONDS > SESSION_ABSOLUTE_SECONDS:
    raise ImproperlyConfigured("CESAFLOW_SESSION_IDLE_SECONDS must not exceed CESAFLOW_SESSION_ABSOLUTE_SECONDS.")
# Open websockets and SSE streams re-check their credentials on every revocation signal and at least this often.
STREAM_REVALIDATE_SECONDS = float(_env_int("CESAFLOW_STREAM_REVALIDATE_SECONDS", 30, minimum=1))
if STREAM_REVALIDATE_SECONDS > 30:
    raise ImproperlyConfigured("CESAFLOW_STREAM_REVALIDATE_SECONDS must be at most 30.")

# Hosts a custom provider base URL may point at even though they are loopback/private (an in-house vLLM or
# Ollama): comma-separated host names, host:port pairs, IPs or CIDR networks (keys/urlguard.py).
PROVIDER_HOST_ALLOWLIST = [h.lower() for h in _env_list("CESAFLOW_PROVIDER_HOST_ALLOWLIST")]

# --- Runs: execution and live streaming ---------------------------------------------------------------

# inline: runs execute as asyncio tasks inside the ASGI server process (one machine). worker: any number of
# `manage.py run_worker` processes, on any machine sharing PostgreSQL and Redis, claim queued runs.
RUN_EXECUTOR = os.environ.get("CESAFLOW_EXECUTOR", "").strip().lower() or "inline"
if RUN_EXECUTOR not in {"inline", "worker"}:
    raise ImproperlyConfigured("CESAFLOW_EXECUTOR must be 'inline' or 'worker'.")
# Every executor proves it is alive each RUN_HEARTBEAT_SECONDS; a running run whose heartbeat is older than
# RUN_STALE_AFTER_SECONDS is marked failed (worker_lost) by any other executor: well within a minute.
RUN_HEARTBEAT_SECONDS = float(_env_int("CESAFLOW_RUN_HEARTBEAT_SECONDS", 10, minimum=1))
RUN_STALE_AFTER_SECONDS = float(_env_int("CESAFLOW_RUN_STALE_AFTER_SECONDS", 30, minimum=2))
if RUN_STALE_AFTER_SECONDS < 2 * RUN_HEARTBEAT_SECONDS:
    raise ImproperlyConfigured("CESAFLOW_RUN_STALE_AFTER_SECONDS must be at least twice the heartbeat interval.")
# Workers wait this long between looks at the queue (a channel-layer nudge wakes them at once).
RUN_WORKER_POLL_SECONDS = float(_env_int("CESAFLOW_RUN_WORKER_POLL_SECONDS", 2, minimum=1))
RUN_WORKER_CONCURRENCY = _env_int("CESAFLOW_RUN_WORKER_CONCURRENCY", 100, minimum=1)
# On shutdown (SIGTERM to a worker, ASGI lifespan shutdown) running runs get this long to finish; the rest are
# stopped and recorded failed, so nothing is left "running".
RUN_SHUTDOWN_GRACE_SECONDS = float(_env_int("CESAFLOW_RUN_SHUTDOWN_GRACE_SECONDS", 10, minimum=0))
# A cancelled run stops within a second even if its channel-layer message is lost: the flag is polled too.
RUN_CANCEL_POLL_SECONDS = 0.5
# Text deltas after the first are batched for this long, so the channel layer is not hit once per token.
RUN_STREAM_COALESCE_SECONDS = 0.04
# Overrides of runs.providers.base.CallLimits for run execution (tests shrink timeouts; empty = defaults).
RUN_CALL_LIMITS: dict[str, Any] = {}
# SSE run streams send a comment this often so proxies and clients keep idle connections open.
SSE_KEEPALIVE_SECONDS = 15.0
# A watched run (chat runs by default) calls the provider only once its stream is attached (the run page's
# websocket, an SSE request, or a streaming create). Nobody within this window: cancelled `not_watched`, no tokens.
RUN_ATTACH_WINDOW_SECONDS = float(_env_int("CESAFLOW_RUN_ATTACH_WINDOW_SECONDS", 30, minimum=1))
# Per-organization run caps (in slots: agent runs weigh more) and the token cap's reservations: a block of these
# settings in its own module, read here because it uses the helpers above.
from cesaflow.settings_limits import *  # noqa: E402, F403

# --- Agent runs: workspaces and the command sandbox ------------------------------------------------------

# One directory per agent run under this root (created 0700, owned by the sandbox user when we run as root).
WORKSPACE_ROOT = Path(os.environ.get("CESAFLOW_WORKSPACE_ROOT", VAR_DIR / "workspaces"))
# A finished run's workspace can be downloaded for this long; the first complete download deletes it earlier.
WORKSPACE_TTL_SECONDS = _env_int("CESAFLOW_WORKSPACE_TTL", 3600, minimum=60)
WORKSPACE_MAX_BYTES = _env_int("CESAFLOW_WORKSPACE_MAX_BYTES", 100 * 1024 * 1024, minimum=1024 * 1024)
WORKSPACE_MAX_FILES = _env_int("CESAFLOW_WORKSPACE_MAX_FILES", 5000, minimum=10)
# bwrap (default; bubblewrap: mount, network and PID namespaces), unshare (util-linux; namespaces but the host
# filesystem stays visible), none (development only: commands run in the workspace directory, unsandboxed).
# The configured mode is self-tested at startup; when it fails, run_command is refused, never downgraded.
SANDBOX_MODE = os.environ.get("CESAFLOW_SANDBOX", "").strip().lower() or "bwrap"
if SANDBOX_MODE not in {"bwrap", "unshare", "none"}:
    raise ImproperlyConfigured("CESAFLOW_SANDBOX must be 'bwrap', 'unshare' or 'none'.")
if PRODUCTION and SANDBOX_MODE == "none":
    # Model-written code with the server's view of the machine: never where real keys and data live.
    raise ImproperlyConfigured("CESAFLOW_SANDBOX=none is for development only; use bwrap (or unshare) in production.")
# Deployment defaults of every agent run's budgets (runs.agent.AgentLimits; a request may ask for others within
# the hard caps there). Unset: 40 steps, 500,000 tokens, 20 minutes, 60 s per command.
AGENT_LIMITS: dict[str, Any] = {
    name: value
    for name, value in (
        ("max_steps", _env_int("CESAFLOW_AGENT_MAX_STEPS", 0)),
        ("max_tokens", _env_int("CESAFLOW_AGENT_MAX_TOKENS", 0)),
        ("wall_clock_s", float(_env_int("CESAFLOW_AGENT_WALL_CLOCK_SECONDS", 0))),
        ("command_timeout_s", float(_env_int("CESAFLOW_AGENT_COMMAND_TIMEOUT_SECONDS", 0))),
    )
    if value
}
# GitHub webhooks: the largest delivery body read (413 beyond, before any parsing; set the reverse proxy's body
# limit for /hooks/ to match) and how long delivery ids are remembered against replays (beyond GitHub's 3-day
# redelivery window).
WEBHOOK_MAX_BODY_BYTES = _env_int("CESAFLOW_WEBHOOK_MAX_BODY_BYTES", 1024 * 1024, minimum=1024)
WEBHOOK_DELIVERY_RETENTION_DAYS = _env_int("CESAFLOW_WEBHOOK_DELIVERY_RETENTION_DAYS", 30, minimum=3)
# Commands never run as the server's own uid when it is root. Each run gets its own uid/gid from the range
# [SANDBOX_UID, SANDBOX_UID + SANDBOX_UIDS) (derived from the run id), so one run's commands cannot use up another's
# process limit (RLIMIT_NPROC counts per uid), signal its processes or read its files. The uids need no passwd
# entry; keep the range clear of real users and of /etc/subuid ranges. SANDBOX_UIDS=1: every run shares one uid.
SANDBOX_UID = _env_int("CESAFLOW_SANDBOX_UID", 200_000, minimum=1)
SANDBOX_GID = _env_int("CESAFLOW_SANDBOX_GID", 200_000, minimum=1)
SANDBOX_UIDS = _env_int("CESAFLOW_SANDBOX_UIDS", 65_536, minimum=1)

# --- Nexus: the operators' admin (nexus/) -------------------------------------------------------------

# Off: no /nexus/ URL at all. The prefix is a path segment without slashes ("nexus" -> /nexus/).
NEXUS_ENABLED = _env_bool("CESAFLOW_NEXUS_ENABLED", True)
NEXUS_PREFIX = os.environ.get("CESAFLOW_NEXUS_PREFIX", "nexus").strip().strip("/") or "nexus"
if "/" in NEXUS_PREFIX or not NEXUS_PREFIX.replace("-", "").replace("_", "").isalnum():
    raise ImproperlyConfigured("CESAFLOW_NEXUS_PREFIX must be one path segment of letters, digits, - and _.")
# Client IPs or CIDR networks allowed to reach Nexus (empty: any); others get a 404, as if it were not there.
NEXUS_ALLOWED_IPS = _env_list("CESAFLOW_NEXUS_ALLOWED_IPS")
# An operator session ends 8 hours after sign-in whatever the activity, and after this long without a request.
NEXUS_SESSION_ABSOLUTE_SECONDS = 8 * 3600
NEXUS_SESSION_IDLE_SECONDS = _env_int("CESAFLOW_NEXUS_SESSION_IDLE_SECONDS", 1800, minimum=60)
if NEXUS_SESSION_IDLE_SECONDS > NEXUS_SESSION_ABSOLUTE_SECONDS:
    raise ImproperlyConfigured("CESAFLOW_NEXUS_SESSION_IDLE_SECONDS must not exceed 8 hours.")
NEXUS_COOKIE_NAME = "__Secure-cf_nexus" if PRODUCTION else "cf_nexus"

# --- Auth -------------------------------------------------------------------------------------------

AUTH_USER_MODEL = "orgs.User"
LOGIN_URL = "orgs:login"
LOGIN_REDIRECT_URL = "orgs:home"
LOGOUT_REDIRECT_URL = "orgs:login"
AUTHENTICATION_BACKENDS = ["django.contrib.auth.backends.ModelBackend"]

# bcrypt over SHA-256: no silent 72-byte truncation, and bcrypt 5 would raise on long input otherwise.
PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.BCryptSHA256PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
    {"NAME": "orgs.validators.MaximumLengthValidator"},
]

# Failed logins: a temporary lock per account and per client IP (audited).
LOGIN_FAILURE_LIMIT_ACCOUNT = _env_int("CESAFLOW_LOGIN_FAILURE_LIMIT_ACCOUNT", 5, minimum=1)
LOGIN_FAILURE_LIMIT_IP = _env_int("CESAFLOW_LOGIN_FAILURE_LIMIT_IP", 30, minimum=1)
LOGIN_LOCKOUT_SECONDS = _env_int("CESAFLOW_LOGIN_LOCKOUT_SECONDS", 900, minimum=1)

INVITATION_TTL_DAYS = 7
AUDIT_RETENTION_DAYS = _env_int("CESAFLOW_AUDIT_RETENTION_DAYS", 90, minimum=1)
# Client IP: trust X-Forwarded-For only when a proxy we run sets it. Unset in production: orgs.W001 (--deploy).
TRUST_X_FORWARDED_FOR = _env_bool("CESAFLOW_TRUST_X_FORWARDED_FOR", False)
TRUST_X_FORWARDED_FOR_SET = bool(os.environ.get("CESAFLOW_TRUST_X_FORWARDED_FOR", "").strip())

# --- Email (cesaflow/settings_email.py) ------------------------------------------------------------------

from cesaflow.settings_email import *  # noqa: E402, F403

# --- Security headers, cookies ----------------------------------------------------------------------

SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "strict-origin-when-cross-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
DATA_UPLOAD_MAX_MEMORY_SIZE = 1024 * 1024

if PRODUCTION:
    SECURE_SSL_REDIRECT = _env_bool("CESAFLOW_SSL_REDIRECT", True)
    # Load balancers probe over plain HTTP inside the private network.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
    # Behind the TLS-terminating proxy, which must set this header (README: deployment).
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = 31536000
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = _env_bool("CESAFLOW_HSTS_PRELOAD", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    # The __Host- prefix pins cookies to this exact host, HTTPS only, path /.
    SESSION_COOKIE_NAME = "__Host-cf_session"
    SESSION_REFRESH_COOKIE_NAME = "__Host-cf_refresh"
    CSRF_COOKIE_NAME = "__Host-cf_csrf"
else:
    SESSION_COOKIE_SECURE = False
    SESSION_COOKIE_NAME = "cf_session"
    SESSION_REFRESH_COOKIE_NAME = "cf_refresh"
    CSRF_COOKIE_NAME = "cf_csrf"

# CSP host-sources cannot express IPv6 literals or wildcard-subdomain entries; 'self' covers same-origin fetches.
_csp_hosts = [h for h in ALLOWED_HOSTS if not h.startswith((".", "[")) and h != "*"]
_ws_sources = ["'self'"] + [f"wss://{h}" for h in _csp_hosts]
if not PRODUCTION:
    _ws_sources += [f"ws://{h}:*" for h in _csp_hosts]
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "connect-src": _ws_sources,
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "frame-ancestors": ["'none'"],
        "form-action": ["'self'"],
    }
}

# --- Request bodies: one limit per route (cesaflow/lib/body_limit.py) -------------------------------

# The largest request body per path prefix (the longest match wins), counted as it arrives: past it the server
# (cesaflow.serve) answers 413 and reads no more, and so does the ASGI app under any other server. Bodies are held in
# memory only, so these bound each connection's memory too. The TLS proxy's limits must match (README: deployment).
REQUEST_BODY_LIMITS: dict[str, int] = {
    "/": DATA_UPLOAD_MAX_MEMORY_SIZE,  # pages and forms (Django refuses larger form bodies anyway)
    "/api/": _env_int("CESAFLOW_API_MAX_BODY_BYTES", 1024 * 1024, minimum=1024),
    # An IDE prompt with its context: 2 MiB is about 500k tokens of text (images and audio are not supported).
    "/api/v1/chat/completions": _env_int("CESAFLOW_GATEWAY_MAX_BODY_BYTES", 2 * 1024 * 1024, minimum=1024),
    "/hooks/github/": WEBHOOK_MAX_BODY_BYTES,
}
# Django spools a body larger than this to a temporary file: never one we accept.
FILE_UPLOAD_MAX_MEMORY_SIZE = max(REQUEST_BODY_LIMITS.values())

# --- Static files -----------------------------------------------------------------------------------

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(os.environ.get("CESAFLOW_STATIC_ROOT", BASE_DIR / "staticfiles"))

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- REST API ---------------------------------------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # The one authentication path (orgs.authentication): an org API key, or the session token cookie (+ CSRF).
        "orgs.authentication.OrgAuthentication",
    ],
    # The tenant gate (orgs.api.base.OrgAPIView) checks capabilities; anything else is denied.
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_PAGINATION_CLASS": "cesaflow.lib.api.CursorPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "cesaflow.lib.api.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "CesaFlow API",
    "DESCRIPTION": "Run AI work with your organization's own provider keys. Authenticate with an org API key "
    "in the `x-api-key` header.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "REDOC_DIST": "SIDECAR",
    # Several resources have a `status`; name each enum after its model's choices.
    "ENUM_NAME_OVERRIDES": {
        "RunStatusEnum": "runs.models.RunStatus",
        "ProviderKeyStatusEnum": "keys.models.KeyStatus",
    },
}

# --- Logging and metrics ----------------------------------------------------------------------------

from cesaflow.settings_api import *  # noqa: E402, F403
from cesaflow.settings_ops import *  # noqa: E402, F403

for _warning in _dev_warnings:
    print(f"WARNING: CesaFlow {_warning}.", file=sys.stderr)  # loud on purpose: logging is not configured yet
