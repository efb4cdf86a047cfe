#!/bin/sh
# The image's entrypoint. Secrets from files (compose and Kubernetes secrets): for each variable below, NAME_FILE=path
# sets NAME to the file's content (trailing newlines dropped), so secrets need not sit in the container's
# configuration. Then, with CESAFLOW_WAIT_FOR_DATABASE=<seconds>, wait until PostgreSQL accepts a connection, and
# with CESAFLOW_WAIT_FOR_MIGRATIONS=<seconds>, until the database is migrated (by the one-shot `migrate` service),
# before starting the command: compose implementations that ignore depends_on conditions start everything at once.
set -eu
for name in CESAFLOW_SECRET_KEY CESAFLOW_SECRET_KEY_FALLBACKS CESAFLOW_KEYRING CESAFLOW_SESSION_KEYS \
            CESAFLOW_CHANNEL_LAYER_KEY DATABASE_URL REDIS_URL CESAFLOW_EMAIL_PASSWORD; do
  eval "file=\${${name}_FILE:-}"
  if [ -n "$file" ]; then
    if [ ! -r "$file" ]; then
      echo "entrypoint: ${name}_FILE names a file this user cannot read" >&2
      exit 64
    fi
    value="$(cat "$file")"
    export "$name=$value"
    unset "${name}_FILE"
  fi
done
unset file value

wait_s="${CESAFLOW_WAIT_FOR_DATABASE:-}"
if [ -n "$wait_s" ]; then
  deadline=$(( $(date +%s) + wait_s ))
  until python -c 'import os, psycopg; psycopg.connect(os.environ["DATABASE_URL"], connect_timeout=3).close()' 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "entrypoint: PostgreSQL did not accept a connection within ${wait_s} s" >&2
      exit 69
    fi
    sleep 2
  done
fi

wait_s="${CESAFLOW_WAIT_FOR_MIGRATIONS:-}"
if [ -n "$wait_s" ]; then
  deadline=$(( $(date +%s) + wait_s ))
  until python manage.py migrate --check >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "entrypoint: the database is still not migrated after ${wait_s} s (is the migrate service done?)" >&2
      exit 69
    fi
    sleep 2
  done
fi
exec "$@"
