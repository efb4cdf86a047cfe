#!/usr/bin/env bash
# `make image`: build CesaFlow's image (and the compose file's PostgreSQL, Redis and Caddy images) with podman from
# a Debian base made here from Debian packages, because no container registry is reachable on this machine kind.
#
# Elsewhere none of this is needed: `docker build -f deploy/Containerfile .` uses the public debian:bookworm-slim.
# Everything this machine kind needs is a command-line flag below, never a change to machine configuration:
#   --runtime runc        crun refuses the VM's hybrid cgroup layout
#   --ulimit …=1024:1024  the VM lacks CAP_SYS_RESOURCE, so the default (higher) limits cannot be set
#   --secret id=ca,…      HTTPS leaves through an intercepting proxy whose CA only the host trusts; the build's pip
#                         step reads it from a secret mount, so it never enters an image layer
#
# Environment: CESAFLOW_IMAGE (default cesaflow), CESAFLOW_BASE_IMAGE (default localhost/cesaflow-base:bookworm,
# built with mmdebstrap when missing; any Debian bookworm image works), IMAGE_SERVICES=0 to skip the service images.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${CESAFLOW_IMAGE:-cesaflow}"
BASE="${CESAFLOW_BASE_IMAGE:-localhost/cesaflow-base:bookworm}"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n1)"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

for tool in podman; do
  command -v "$tool" >/dev/null 2>&1 || { echo "make image needs $tool (Debian: apt-get install podman runc)" >&2; exit 2; }
done

# Flags for `podman run` on this machine kind (deploy/image-smoke.sh and the compose smoke use them too).
. deploy/podman-flags.sh

if ! podman image exists "$BASE"; then
  command -v mmdebstrap >/dev/null 2>&1 || { echo "building $BASE needs mmdebstrap (apt-get install mmdebstrap)" >&2; exit 2; }
  echo "== base image $BASE from Debian packages (mmdebstrap, once; later builds reuse it)"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  # unshare mode: the build's mounts (/proc …) live in a namespace of their own and vanish with it, even when a
  # process still holds them (root mode then fails to unmount "target is busy").
  mmdebstrap --quiet --mode=unshare --variant=minbase --include=ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --aptopt='APT::Install-Recommends "false"' \
    bookworm "$work/rootfs.tar" \
    "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" "deb $SECURITY_MIRROR bookworm-security main"
  podman import --quiet --change 'CMD ["/bin/bash"]' "$work/rootfs.tar" "$BASE" >/dev/null
  rm -rf "$work"
  trap - EXIT
fi

build() {  # build <tag> <containerfile> [extra podman build args]
  local tag="$1" file="$2"
  shift 2
  echo "== $tag ($file)"
  podman build --format docker "${PODMAN_BUILD_FLAGS[@]}" --build-arg "BASE=$BASE" -f "$file" -t "$tag" "$@" .
}

ca_args=()
for ca in /etc/ssl/certs/ca-certificates.crt; do
  [ -f "$ca" ] && ca_args=(--secret "id=ca,src=$ca")
done

start=$SECONDS
build "$IMAGE:$VERSION" deploy/Containerfile "${ca_args[@]}"
podman tag "$IMAGE:$VERSION" "$IMAGE:latest"
if [ "${IMAGE_SERVICES:-1}" != 0 ]; then
  build localhost/cesaflow-postgres:15 deploy/postgres/Containerfile
  build localhost/cesaflow-redis:7 deploy/redis/Containerfile
  build localhost/cesaflow-caddy:2 deploy/caddy/Containerfile
fi
echo "== built $IMAGE:$VERSION in $((SECONDS - start)) s; size: $(podman image inspect --format '{{.Size}}' "$IMAGE:$VERSION" | awk '{printf "%.0f MB", $1/1e6}')"
