#!/usr/bin/env bash
# `make image-smoke`: build the image (make image; cached layers make a rebuild quick), run it with a throwaway
# database on the machine's PostgreSQL and a key prefix on its Redis (host networking, loopback only), and check:
#   * GET /readyz answers 200 from the running container, and its HEALTHCHECK reports healthy;
#   * it runs as uid 10001 on a read-only root filesystem, with no compiler in the image;
#   * the agent command sandbox (bwrap) works inside it: self-test, then a command that writes its workspace and
#     sees neither /app, nor the network, nor the server's environment (deploy/sandbox_check.py).
# Skips (exit 0, saying why) when podman is not installed.
#
# Environment: SMOKE_PG_ADMIN_URL (postgres://postgres@127.0.0.1:5432/postgres), SMOKE_DB (cesaflow_image_smoke;
# dropped and created), SMOKE_REDIS_URL (redis://127.0.0.1:6379/9), SMOKE_PORT (18080), SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v podman >/dev/null 2>&1; then
  echo "SKIP image smoke: podman is not installed (Debian: apt-get install podman runc mmdebstrap)"
  exit 0
fi
. deploy/podman-flags.sh

PG_ADMIN_URL="${SMOKE_PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
DB="${SMOKE_DB:-cesaflow_image_smoke}"
REDIS_URL="${SMOKE_REDIS_URL:-redis://127.0.0.1:6379/9}"
PORT="${SMOKE_PORT:-18080}"
IMAGE="${CESAFLOW_IMAGE:-cesaflow}:latest"
NAME="cesaflow-smoke-$$"
VOLUME="cesaflow-smoke-ws-$$"

start=$SECONDS
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  IMAGE_SERVICES=0 deploy/image.sh
fi
built=$SECONDS

work="$(mktemp -d)"
cleanup() {
  podman rm -f --time 5 "$NAME" >/dev/null 2>&1 || true
  podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
  psql "$PG_ADMIN_URL" -qc "DROP DATABASE IF EXISTS \"$DB\"" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL image smoke: $*" >&2
  podman logs --tail 40 "$NAME" >&2 2>/dev/null || true
  exit 1
}

psql "$PG_ADMIN_URL" -qc "DROP DATABASE IF EXISTS \"$DB\"" -c "CREATE DATABASE \"$DB\"" >/dev/null
# Throwaway production secrets, in a 0600 env file (never on a command line).
umask 077
python3 - "$work/env" "${PG_ADMIN_URL%/*}/$DB" "$REDIS_URL" <<'PY'
import base64, secrets, sys
path, database_url, redis_url = sys.argv[1:]
key = lambda: "1:" + base64.b64encode(secrets.token_bytes(32)).decode()
with open(path, "w") as handle:
    handle.write(
        f"CESAFLOW_SECRET_KEY={secrets.token_urlsafe(50)}\nCESAFLOW_KEYRING={key()}\nCESAFLOW_SESSION_KEYS={key()}\n"
        f"CESAFLOW_CHANNEL_LAYER_KEY={secrets.token_urlsafe(32)}\nDATABASE_URL={database_url}\nREDIS_URL={redis_url}\n"
        f"CESAFLOW_CACHE_PREFIX=smoke{secrets.token_hex(4)}\nCESAFLOW_ALLOWED_HOSTS=localhost\n"
        "CESAFLOW_EXECUTOR=worker\nCESAFLOW_LOG_LEVEL=WARNING\n"
    )
PY
umask 022
run_flags=("${PODMAN_RUN_FLAGS[@]}" --network host --env-file "$work/env" --read-only --tmpfs /tmp)

podman run --rm "${run_flags[@]}" --no-healthcheck "$IMAGE" python manage.py migrate --noinput -v 0 \
  || fail "migrate failed"
podman volume create "$VOLUME" >/dev/null
# systempaths=unconfined: bwrap mounts a fresh /proc, which the kernel refuses while the runtime's masks cover
# parts of the container's /proc (README: the sandbox in a container).
podman run -d --name "$NAME" "${run_flags[@]}" -e CESAFLOW_HEALTHCHECK_PORT="$PORT" \
  --security-opt systempaths=unconfined -v "$VOLUME:/var/lib/cesaflow/workspaces" \
  "$IMAGE" python -m cesaflow.serve -v 0 -b 127.0.0.1 -p "$PORT" cesaflow.asgi:application >/dev/null 2>"$work/run.err" \
  || { cat "$work/run.err" >&2; fail "the container did not start"; }

ready=""
for _ in $(seq 1 90); do
  code="$(python3 -c "
import http.client, sys
c = http.client.HTTPConnection('127.0.0.1', $PORT, timeout=5)
try:
    c.request('GET', '/readyz', headers={'Host': 'localhost'}); print(c.getresponse().status)
except OSError:
    print(0)" 2>/dev/null)"
  if [ "$code" = 200 ]; then ready=1; break; fi
  [ "$(podman inspect --format '{{.State.Running}}' "$NAME" 2>/dev/null)" = true ] || fail "the container exited"
  sleep 1
done
[ -n "$ready" ] || fail "/readyz did not answer 200 within 90 s (last: $code)"
echo "ok   /readyz answers 200 from the running container"

podman healthcheck run "$NAME" >/dev/null 2>&1 || fail "the image's HEALTHCHECK did not pass"
echo "ok   HEALTHCHECK (deploy/healthcheck.py) passes"

[ "$(podman exec "$NAME" id -u)" = 10001 ] || fail "the server does not run as uid 10001"
podman exec "$NAME" sh -c 'touch /app/x 2>/dev/null' && fail "the root filesystem is writable"
podman exec "$NAME" sh -c 'command -v gcc || command -v cc || command -v pip3' >/dev/null && fail "build tools in the final image"
echo "ok   uid 10001, read-only root filesystem, no build tools"

sandbox="$(podman exec "$NAME" python deploy/sandbox_check.py 2>&1)" || fail "sandbox: $sandbox"
echo "ok   bwrap sandbox inside the container: $sandbox"
echo "image smoke passed: build $((built - start)) s, smoke $((SECONDS - built)) s," \
  "image $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
