#!/usr/bin/env bash
# Run one task of a job (one rank, or horovodrun itself) inside the hvd_rsgc image with podman,
# sharing the calling node's network, IPC and PID namespaces: the container is one more process
# of the node, so a launcher outside (horovodrun over ssh, mpirun, srun + PMIx) places one
# container per rank on every node and the ranks talk over the node's own interfaces.
#
#   docker/podman-task.sh IMAGE CMD [ARG...]
#
#   # one container per node, one horovodrun job across them (Gloo; ranks reach the launcher's
#   # rendezvous server through the nodes' network):
#   horovodrun -np 2 -H node1:1,node2:1 --gloo docker/podman-task.sh hvd_rsgc:cpu \
#       python -m hvd_rsgc.train --config examples/configs/demo.yaml
#   # the same with Open MPI's launcher (Horovod's MPI controller; the image's Open MPI must be
#   # the host's major version, e.g. Debian bookworm's 4.1 on both sides):
#   mpirun -H node1,node2 -np 2 docker/podman-task.sh hvd_rsgc:cpu python -m hvd_rsgc.train ...
#   # Slurm: slurm/launch.sh uses this script when CONTAINER_RUNTIME=podman.
#
# Mounted at the same paths: the current directory (the checkout: run from it), every directory
# in HVD_RSGC_MOUNTS (colon-separated) and, read-only, in HVD_RSGC_MOUNTS_RO, the
# PMIx server directories of a Slurm step (PMIX_SERVER_TMPDIR, PMIX_SYSTEM_TMPDIR) and Open MPI's
# session directory (OMPI_MCA_orte_top_session_dir, else /tmp when mpirun launched the task).
# Passed in: SLURM_* PMIX_* PMI_* OMPI_* HOROVOD_* NCCL_* CUDA_VISIBLE_DEVICES, PYTHONUNBUFFERED.
# The task runs as the caller's uid:gid. PODMAN_OPTS: extra `podman run` options (split on
# white space), e.g. "--device nvidia.com/gpu=all" (CDI) on GPU nodes, or "--label key=value".
# The image must be in each node's podman storage (`podman load` / a shared registry).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 IMAGE CMD [ARG...]" >&2; exit 2; }
IMAGE="$1"; shift
command -v podman >/dev/null || { echo "podman-task: podman is not installed on $(hostname)" >&2; exit 127; }

OPTS=(--rm --no-healthcheck --network host --ipc host --pid host --user "$(id -u):$(id -g)"
      --volume "$PWD:$PWD" --workdir "$PWD"
      --env 'SLURM_*' --env 'PMIX_*' --env 'PMI_*' --env 'OMPI_*' --env 'HOROVOD_*'
      --env 'NCCL_*' --env 'CUDA_VISIBLE_DEVICES' --env PYTHONUNBUFFERED=1)
SEEN=("$PWD")
mount() {               # DIR [:ro]: at the same path, once, unless it lies inside one already mounted
    local d="$1" m
    [ -n "$d" ] && [ -d "$d" ] || return 0
    d="$(cd "$d" && pwd -P)"
    for m in "${SEEN[@]}"; do case "$d/" in "$m"/*) return 0 ;; esac; done
    SEEN+=("$d")
    OPTS+=(--volume "$d:$d${2:-}")
}
IFS=: read -r -a RO <<< "${HVD_RSGC_MOUNTS_RO:-}"
IFS=: read -r -a RW <<< "${HVD_RSGC_MOUNTS:-}"
for d in ${RO[@]+"${RO[@]}"}; do mount "$d" :ro; done
for d in ${RW[@]+"${RW[@]}"}; do mount "$d"; done
mount "${PMIX_SERVER_TMPDIR:-}"
mount "${PMIX_SYSTEM_TMPDIR:-}"
if [ -n "${OMPI_MCA_orte_top_session_dir:-}" ]; then
    mount "$OMPI_MCA_orte_top_session_dir"
elif [ -n "${OMPI_COMM_WORLD_RANK:-}" ] && [ -z "${SLURM_STEP_ID:-}" ]; then
    mount /tmp          # mpirun's orted keeps its PMIx rendezvous files under /tmp/ompi.*
fi
# Open MPI's shared-memory transport must not use CMA across the ranks' separate containers
OPTS+=(--env "OMPI_MCA_btl_vader_single_copy_mechanism=${OMPI_MCA_btl_vader_single_copy_mechanism:-none}")
# shellcheck disable=SC2206  # PODMAN_OPTS is split into words on purpose
OPTS+=(${PODMAN_OPTS:-})
# The container lives outside the caller's process tree and cgroup (conmon keeps it): a podman
# client killed with SIGKILL (a Slurm step past KillWait, the OOM killer, scancel -s KILL) would
# leave the task running. So the task runs under a watch that sees the client through the host
# PID namespace and ends the task (TERM, then KILL after 10 s) once the client is gone; signals
# that podman proxies (TERM, INT, HUP, USR1, USR2, QUIT) are passed on, and the task's exit
# status is the container's.
# shellcheck disable=SC2016  # expanded inside the container
WATCH='
started() { local s; read -r s < "/proc/$1/stat" 2>/dev/null || return 0; s=${s##*) }; set -- $s; echo "${20}"; }
client=$1; shift
since=$(started "$client")
"$@" &
task=$!
for s in TERM INT HUP USR1 USR2 QUIT; do trap "kill -$s $task 2>/dev/null" "$s"; done
while kill -0 "$task" 2>/dev/null; do
    if [ -n "$since" ] && [ "$(started "$client")" != "$since" ]; then   # (no host PIDs: no watch)
        echo "podman-task: the podman client (pid $client) is gone; stopping the task" >&2
        kill -TERM "$task" 2>/dev/null
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$task" 2>/dev/null || break; sleep 1; done
        kill -KILL "$task" 2>/dev/null
        break
    fi
    sleep 1 & wait $!
done
while :; do wait "$task"; rc=$?; [ "$rc" -gt 128 ] && kill -0 "$task" 2>/dev/null && continue; exit "$rc"; done
'
exec podman run "${OPTS[@]}" "$IMAGE" bash -c "$WATCH" podman-task "$$" "$@"
