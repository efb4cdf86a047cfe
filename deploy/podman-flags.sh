# Sourced by deploy/*.sh: podman flags this machine kind needs (a VM with a hybrid cgroup layout and without
# CAP_SYS_RESOURCE). Override with PODMAN_RUNTIME= / PODMAN_ULIMITS= on hosts that need none of them.
PODMAN_RUNTIME="${PODMAN_RUNTIME-runc}"
PODMAN_ULIMITS="${PODMAN_ULIMITS-nofile=1024:1024 nproc=1024:1024}"
PODMAN_RUN_FLAGS=()
PODMAN_BUILD_FLAGS=()
if [ -n "$PODMAN_RUNTIME" ]; then
  PODMAN_RUN_FLAGS+=(--runtime "$PODMAN_RUNTIME")
  PODMAN_BUILD_FLAGS+=(--runtime "$PODMAN_RUNTIME")
fi
for limit in $PODMAN_ULIMITS; do
  PODMAN_RUN_FLAGS+=(--ulimit "$limit")
  PODMAN_BUILD_FLAGS+=(--ulimit "$limit")
done
