# Shared launcher for the hvd_rsgc sbatch scripts (sourced, not submitted).
#
# Environment (pass with `sbatch --export=ALL,KEY=value ...`; all optional):
#   CONFIG           training config (default: set by the sbatch script)
#   DATA_ROOT        data set folder (overrides data_root in the config)
#   OVERRIDES        extra "--key value" config overrides, e.g. "--epochs 100 --density 0.001"
#   RUN_DIR          run directory (default runs/<job name>-<job id>: stable across requeues)
#   LAUNCHER         auto | srun | horovodrun   (auto: srun on several nodes, horovodrun on one)
#   VENV             virtualenv with hvd_rsgc + Horovod (default <repo>/.venv)
#   CONTAINER        the image every rank runs in, with CONTAINER_RUNTIME:
#   CONTAINER_RUNTIME  apptainer (default): CONTAINER is a .sif, `apptainer exec --nv`;
#                    podman: CONTAINER is an image in the node's podman storage (e.g. hvd_rsgc:cpu
#                    from docker/Dockerfile.cpu), each task runs in `podman run --rm --network host
#                    --ipc host --pid host` as the job's user, with the checkout, RUN_DIR, DATA_ROOT
#                    (and PMIx's directories for srun) mounted at the same paths
#   PODMAN_OPTS      extra `podman run` options, e.g. "--device nvidia.com/gpu=all" (CDI) on GPUs
#   CONTAINER_IMAGE  pyxis/enroot image: srun --container-image=... (always the srun launcher; the
#                    image's own python; the checkout, RUN_DIR's parent and DATA_ROOT mounted)
#   HVD_RSGC_HOME    repository checkout (default: the directory sbatch was called from)
#   HVD_RSGC_DRY_RUN 1: print the training arguments and exit (checks OVERRIDES quoting)
#
# Requeue/resume: the job is submitted with --requeue and --signal=B:USR1@<s>; on USR1 (the time
# limit is near) or after a node failure Slurm requeues it with the same job id, so RUN_DIR is
# the same and the next start resumes from its last checkpoint (bit-exact; same task count).
set -euo pipefail
cd "${HVD_RSGC_HOME:-${SLURM_SUBMIT_DIR:-.}}"
: "${CONFIG:?CONFIG must be set}"
RUN_DIR="${RUN_DIR:-runs/${SLURM_JOB_NAME:-hvd-rsgc}-${SLURM_JOB_ID:-local}}"
NTASKS="${SLURM_NTASKS:-1}"
NNODES="${SLURM_JOB_NUM_NODES:-1}"
LAUNCHER="${LAUNCHER:-auto}"
if [ "$LAUNCHER" = auto ]; then
    # pyxis containers exist only through srun: one node too (srun --mpi=pmix runs Horovod there)
    if [ "$NNODES" -gt 1 ] || [ -n "${CONTAINER_IMAGE:-}" ]; then LAUNCHER=srun; else LAUNCHER=horovodrun; fi
fi
if [ -n "${CONTAINER_IMAGE:-}" ] && [ "$LAUNCHER" != srun ]; then
    echo "[hvd_rsgc] error: CONTAINER_IMAGE (pyxis) needs LAUNCHER=srun, got LAUNCHER=$LAUNCHER" >&2
    exit 2
fi
mkdir -p "$(dirname "$RUN_DIR")"
RUN_PARENT="$(cd "$(dirname "$RUN_DIR")" && pwd)"     # absolute: mounted into containers

if [ -n "${CONTAINER:-}" ] && [ "${CONTAINER_RUNTIME:-apptainer}" = podman ]; then
    # docker/podman-task.sh: one container per task on the node that runs it (host network, IPC
    # and PID; the checkout, RUN_DIR's parent, DATA_ROOT read-only and a Slurm step's PMIx
    # directories mounted at the same paths; the launchers' environment passed in)
    export HVD_RSGC_MOUNTS="${HVD_RSGC_MOUNTS:+$HVD_RSGC_MOUNTS:}$(dirname "$RUN_DIR")"
    [ -n "${DATA_ROOT:-}" ] && export HVD_RSGC_MOUNTS_RO="${HVD_RSGC_MOUNTS_RO:+$HVD_RSGC_MOUNTS_RO:}$DATA_ROOT"
    export PODMAN_OPTS="--label hvd_rsgc.slurm_job=${SLURM_JOB_ID:-local} ${PODMAN_OPTS:-}"
    TASK=("$PWD/docker/podman-task.sh" "$CONTAINER")
    PY=("${TASK[@]}" python)
    HVDRUN=("${TASK[@]}" horovodrun)
    HVDRUN_PY=(python)          # one container holds horovodrun and all its ranks
elif [ -n "${CONTAINER:-}" ]; then
    # the checkout, RUN_DIR's parent and the data set at the same paths inside
    BINDS="$PWD,$RUN_PARENT${DATA_ROOT:+,$DATA_ROOT:$DATA_ROOT:ro}"
    PY=(apptainer exec --nv --bind "$BINDS" "$CONTAINER" python)
    HVDRUN=(apptainer exec --nv --bind "$BINDS" "$CONTAINER" horovodrun)
    HVDRUN_PY=("${PY[@]}")
elif [ -n "${CONTAINER_IMAGE:-}" ]; then
    PY=(python)                 # the image's own (its PATH: /opt/hvd_rsgc/.venv/bin first)
    HVDRUN=() HVDRUN_PY=()
else
    VENV="${VENV:-$PWD/.venv}"
    PY=("$VENV/bin/python")
    HVDRUN=("$VENV/bin/horovodrun")
    HVDRUN_PY=("${PY[@]}")
fi

# OVERRIDES is split on white space and never glob-expanded ("[0.5,0.75]" stays as written even
# where a file "5" exists); ${EXTRA[@]+...} keeps an empty list safe under `set -u` on bash <= 4.3
read -r -a EXTRA <<< "${OVERRIDES:-}"
if ls "$RUN_DIR"/checkpoints/epoch[0-9][0-9][0-9][0-9].pt >/dev/null 2>&1; then
    echo "[hvd_rsgc] resuming from $RUN_DIR (restart count ${SLURM_RESTART_COUNT:-0})"
    ARGS=(--resume "$RUN_DIR" ${EXTRA[@]+"${EXTRA[@]}"})
else
    echo "[hvd_rsgc] new run in $RUN_DIR"
    ARGS=(--config "$CONFIG" --out_dir "$(dirname "$RUN_DIR")" --run_name "$(basename "$RUN_DIR")"
          --progress false)
    [ -n "${DATA_ROOT:-}" ] && ARGS+=(--data_root "$DATA_ROOT")
    ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})
fi

# Checkpoints are written at the end of an epoch: an allocation that wrote none would restart
# from the same point when requeued, and so again and again while it holds the queue; it is not
# requeued but ends at its time limit with an error that says why
newest_checkpoint() {
    local f newest=0 t
    for f in "$RUN_DIR"/checkpoints/epoch[0-9][0-9][0-9][0-9].pt; do
        [ -f "$f" ] || continue
        t="$(stat -c %Y "$f")"
        [ "$t" -gt "$newest" ] && newest="$t"
    done
    echo "$newest"
}
requeue() {
    if [ "$(newest_checkpoint)" -lt "$START" ]; then
        echo "[hvd_rsgc] error: USR1 (time limit near) but this allocation wrote no checkpoint" \
             "in $RUN_DIR/checkpoints since it started: a requeue would start again from the" \
             "same point. Not requeueing job ${SLURM_JOB_ID}; give it a --time longer than an" \
             "epoch plus the start-up (or fewer steps per epoch: --max_steps_per_epoch)" >&2
        return
    fi
    echo "[hvd_rsgc] USR1: time limit near, requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
}
trap requeue USR1

if [ "$LAUNCHER" = srun ]; then
    # One task per GPU; Horovod's MPI controller initialised through PMIx. Since Slurm 22.05
    # srun does not inherit the job's --cpus-per-task: without it every task gets one CPU
    # (and the DataLoader workers share it)
    CMD=(srun --mpi=pmix --kill-on-bad-exit=1)
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && CMD+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    [ -n "${CONTAINER_IMAGE:-}" ] && CMD+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$PWD"
        --container-mounts="$PWD:$PWD,$RUN_PARENT:$RUN_PARENT${DATA_ROOT:+,$DATA_ROOT:$DATA_ROOT:ro}")
    CMD+=("${PY[@]}" -m hvd_rsgc.train)
else
    CMD=("${HVDRUN[@]}" -np "$NTASKS" -H "localhost:$NTASKS" --gloo "${HVDRUN_PY[@]}" -m hvd_rsgc.train)
fi

echo "[hvd_rsgc] launcher=$LAUNCHER tasks=$NTASKS nodes=$NNODES config=$CONFIG"
if [ "${HVD_RSGC_DRY_RUN:-0}" = 1 ]; then    # the launch command ("launch: " a word), then the
    printf 'launch: %s\n' "${CMD[@]}"        # training arguments, one a line
    printf '%s\n' "${ARGS[@]}"
    exit 0
fi
START="$(date +%s)"
"${CMD[@]}" "${ARGS[@]}" &
PID=$!
# wait in the background so the USR1 trap runs while training is still going. The trap cuts a
# wait short (status > 128), so wait again while the launcher runs (a refused requeue: the
# training goes on, and may yet end, until the time limit); without errexit, which bash 5.2
# applies to the interrupted wait even after `||` and ends the script there
set +e
while :; do
    wait "$PID"
    status=$?
    if [ "$status" -gt 128 ] && kill -0 "$PID" 2>/dev/null; then continue; fi
    break
done
set -e
# srun (Slurm 22.05) exits 0 when a step's tasks could not even be launched (e.g. a PMIx
# socket path over 107 bytes): a run that ended without writing its summary did not succeed
if [ "${status:-0}" = 0 ] && { [ ! -f "$RUN_DIR/summary.json" ] || [ "$(stat -c %Y "$RUN_DIR/summary.json")" -lt "$START" ]; }; then
    echo "[hvd_rsgc] error: $LAUNCHER exited 0 but the training wrote no $RUN_DIR/summary.json;" \
         "the tasks did not run to the end (see the job's stderr and slurmd's log)" >&2
    status=1
fi
exit "$status"
