#!/usr/bin/env bash
# `make compose-smoke`: bring deploy/compose.yaml up with podman-compose from the images `make image` builds, reach
# CesaFlow over HTTPS on loopback through Caddy, create an organization and an org API key inside the web container,
# then (deploy/compose_smoke_client.py, on the host) add a provider key pointing at the provider simulator (a
# compose service of deploy/compose.smoke.yaml: never the internet) and stream a run over HTTPS to its end.
# Everything it started is removed at the end (containers, network, volumes, secrets).
#
# Environment: SMOKE_HTTPS_PORT (18443), SKIP_BUILD=1, KEEP=1 (leave the stack up for a look).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v podman >/dev/null 2>&1; then
  echo "SKIP compose smoke: podman is not installed (Debian: apt-get install podman runc mmdebstrap podman-compose)"
  exit 0
fi
if ! command -v podman-compose >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman-compose >/dev/null
  else
    echo "SKIP compose smoke: podman-compose is not installed (Debian: apt-get install podman-compose)"
    exit 0
  fi
fi
if [ ! -f deploy/proxy/Caddyfile ]; then
  echo "FAIL compose smoke: deploy/proxy/Caddyfile (the TLS proxy's configuration) is missing" >&2
  exit 1
fi
. deploy/podman-flags.sh

PORT="${SMOKE_HTTPS_PORT:-18443}"
PROJECT=cesaflow-smoke
start=$SECONDS
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  deploy/image.sh
fi
built=$SECONDS

work="$(mktemp -d)"
export CESAFLOW_SECRETS_DIR="$work/secrets"
export CESAFLOW_IMAGE=localhost/cesaflow:latest POSTGRES_IMAGE=localhost/cesaflow-postgres:15
export REDIS_IMAGE=localhost/cesaflow-redis:7 CADDY_IMAGE=localhost/cesaflow-caddy:2
export CESAFLOW_HTTPS_BIND=127.0.0.1 CESAFLOW_HTTPS_PORT="$PORT" CADDY_SITE=https://localhost:8443
export CESAFLOW_ALLOWED_HOSTS=localhost CESAFLOW_CSRF_TRUSTED_ORIGINS="https://localhost:$PORT"
export CESAFLOW_PROVIDER_HOST_ALLOWLIST=simulator
deploy/make-secrets.sh "$CESAFLOW_SECRETS_DIR" >/dev/null

pc() {
  podman-compose --no-ansi -p "$PROJECT" --podman-run-args "${PODMAN_RUN_FLAGS[*]}" \
    -f deploy/compose.yaml -f deploy/compose.smoke.yaml "$@"
}
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then
    echo "KEEP=1: the stack is still up (podman ps; remove with podman-compose -p $PROJECT down)"
    return
  fi
  pc down >/dev/null 2>&1 || true
  for volume in pgdata workspaces static; do
    podman volume rm -f "${PROJECT}_$volume" >/dev/null 2>&1 || true
  done
  podman network rm -f "${PROJECT}_default" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL compose smoke: $*" >&2
  for service in migrate web worker proxy; do
    echo "--- $service" >&2
    podman logs --tail 15 "${PROJECT}_${service}_1" >&2 2>/dev/null || true
  done
  exit 1
}

pc up -d >"$work/up.log" 2>&1 || { cat "$work/up.log" >&2; fail "podman-compose up failed"; }

probe() {
  python3 - "$PORT" "$CESAFLOW_SECRETS_DIR/tls_cert.pem" <<'PY'
import http.client, ssl, sys
context = ssl.create_default_context(cafile=sys.argv[2])
conn = http.client.HTTPSConnection("localhost", int(sys.argv[1]), context=context, timeout=5)
try:
    conn.request("GET", "/readyz")
    print(conn.getresponse().status)
except (OSError, ssl.SSLError):
    print(0)
PY
}
ready=""
for _ in $(seq 1 180); do
  if [ "$(probe)" = 200 ]; then ready=1; break; fi
  sleep 1
done
[ -n "$ready" ] || fail "https://localhost:$PORT/readyz did not answer 200 within 180 s"
up_s=$((SECONDS - built))
echo "ok   https://localhost:$PORT/readyz answers 200 through Caddy ($up_s s after up)"

web="${PROJECT}_web_1"
# The admin's password goes in on stdin (create_org reads it from a pipe), never on a command line.
python3 -c 'import secrets; print(secrets.token_urlsafe(24))' \
  | podman exec -i "$web" /app/deploy/entrypoint.sh python manage.py create_org --name "Compose Smoke" \
    --slug compose-smoke --admin-email admin@compose-smoke.example >/dev/null || fail "create_org failed"
podman exec "$web" /app/deploy/entrypoint.sh python manage.py create_api_key --org compose-smoke --name compose-smoke \
  --scopes keys:write keys:read runs:write runs:read | tail -n1 > "$work/api_key" \
  || fail "create_api_key failed"
python3 deploy/compose_smoke_client.py "https://localhost:$PORT" "$CESAFLOW_SECRETS_DIR/tls_cert.pem" - \
  < "$work/api_key" || fail "the run did not stream through the proxy"
sandbox="$(podman exec "${PROJECT}_worker_1" /app/deploy/entrypoint.sh python deploy/sandbox_check.py 2>&1)" \
  || fail "the worker's sandbox: $sandbox"
echo "ok   agent commands run in bwrap inside the worker container"
echo "compose smoke passed: build $((built - start)) s, up to ready ${up_s} s, total $((SECONDS - start)) s"
