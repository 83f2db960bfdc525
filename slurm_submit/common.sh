# Shared by every slurm_submit/*.sbatch script; sourced after the script has found the repository
# (HEADCT_REPO). It activates the environment, works out processes and nodes, starts one
# `torchrun` per node with `srun`, turns SIGUSR1 (sent by Slurm before the time limit with
# `#SBATCH --signal=B:USR1@SECONDS`) into "checkpoint, then requeue", and passes the script's
# arguments on: the first is the config file, the rest are KEY VALUE pairs for --opts.
#
# Environment variables (all optional):
#   HEADCT_REPO            the repository root (default: found from the submitted script's path)
#   HEADCT_ENV_ACTIVATE    shell command that activates the Python environment, e.g.
#                          'source /path/venv/bin/activate' or 'conda activate headct'
#                          (default: $HEADCT_REPO/.venv when present, else the python on PATH)
#   HEADCT_PYTHON          the interpreter (default: python, after activation)
#   HEADCT_NPROC           training processes per node (default: GPUs of the allocation on the
#                          node, from SLURM_GPUS_ON_NODE or CUDA_VISIBLE_DEVICES; 1 without GPUs)
#   HEADCT_RDZV_PORT       c10d rendezvous port on the first node of a multi-node job
#                          (default: 20000 + job id modulo 10000)
#   HEADCT_MAX_REQUEUES    stop requeueing after this many restarts (default: 100)
#   HEADCT_MAX_RESTARTS    torchrun --max_restarts: times a group whose rank died (SIGKILL, out of
#                          memory) is started again inside the job, resuming from checkpoint_last.pth
#                          (default: 0, the job fails)
#   HEADCT_SHUTDOWN_TIMEOUT seconds torchrun waits for workers to exit before SIGKILL (default: 300)
#   HEADCT_DRY_RUN=1       print the launch command and exit without running it
#   HEADCT_SWEEP_KEY, HEADCT_SWEEP_VALUES, HEADCT_SWEEP_INDEX   (job arrays) see headct_sweep below
# Outside Slurm (bash slurm_submit/X.sbatch ...) the same command runs without srun on this machine.

# Print a message prefixed with the time, to the job's output file.
headct_log() {
    echo "[headct $(date '+%F %T')] $*"
}

headct_die() {
    echo "[headct] error: $*" >&2
    exit 2
}

# Activate the Python environment (see HEADCT_ENV_ACTIVATE above); sets HEADCT_PYTHON.
headct_activate() {
    [ "${_HEADCT_ACTIVATED:-0}" = 1 ] && return 0
    _HEADCT_ACTIVATED=1
    set +u  # activation scripts (conda's in particular) read unset variables
    if [ -n "${HEADCT_ENV_ACTIVATE:-}" ]; then
        eval "$HEADCT_ENV_ACTIVATE" || { set -u; headct_die "HEADCT_ENV_ACTIVATE failed: $HEADCT_ENV_ACTIVATE"; }
    elif [ -f "$HEADCT_REPO/.venv/bin/activate" ]; then
        # shellcheck disable=SC1091
        source "$HEADCT_REPO/.venv/bin/activate"
    fi
    set -u
    HEADCT_PYTHON="${HEADCT_PYTHON:-python}"
    command -v "$HEADCT_PYTHON" >/dev/null 2>&1 || headct_die "no '$HEADCT_PYTHON' on PATH; set \
HEADCT_ENV_ACTIVATE (e.g. 'source /path/venv/bin/activate') or create $HEADCT_REPO/.venv (make install)"
}

# Training processes per node: HEADCT_NPROC, else the GPUs of the allocation, else 1 (CPU).
headct_nproc() {
    local n="${HEADCT_NPROC:-}"
    if [ -z "$n" ] && [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        n="${SLURM_GPUS_ON_NODE##*:}"  # a count; some versions write type:count
    fi
    if [ -z "$n" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$CUDA_VISIBLE_DEVICES" != "NoDevFiles" ]; then
        n=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
    fi
    if [ -z "$n" ] || [ "$n" = 0 ]; then
        n=1
    fi
    case "$n" in
        ''|*[!0-9]*) headct_die "processes per node '$n' is not a positive integer (HEADCT_NPROC?)" ;;
    esac
    echo "$n"
}

# The first host of the allocation: the c10d rendezvous endpoint of multi-node runs.
headct_first_host() {
    local hosts
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || return 1
    echo "${hosts%%$'\n'*}"  # (no `| head -n1`: under pipefail, scontrol may die of SIGPIPE)
}

# Resolve the config path: as given (absolute or relative to the repository), else relative to
# the folder sbatch was called from.
headct_resolve_cfg() {
    local cfg="$1"
    if [ -f "$cfg" ]; then
        echo "$cfg"
    elif [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/$cfg" ]; then
        echo "$SLURM_SUBMIT_DIR/$cfg"
    else
        headct_die "config file '$cfg' not found (relative paths are read from the repository \
$HEADCT_REPO or from the submit folder ${SLURM_SUBMIT_DIR:-$PWD})"
    fi
}

# Send signal $1 to process $2 and all its descendants (found in /proc; no procps needed).
headct_signal_tree() {
    local sig="$1" pid="$2" f stat
    local -a kids=()
    for f in /proc/[0-9]*/stat; do
        stat=$(<"$f") 2>/dev/null || continue
        stat="${stat##*) }"  # drop "pid (comm) "; what is left starts with "state ppid"
        set -- $stat
        [ "${2:-}" = "$pid" ] && kids+=("${f//[^0-9]/}")
    done
    kill "-$sig" "$pid" 2>/dev/null || true
    for f in "${kids[@]}"; do
        headct_signal_tree "$sig" "$f"
    done
}

_headct_on_usr1() {
    HEADCT_PREEMPTED=1
    headct_log "got SIGUSR1: asking the run to write checkpoint_last.pth and stop"
    # The training processes checkpoint at the next step boundary; torchrun itself ignores SIGUSR1
    # (see below). Under Slurm, srun forwards the signal to every process of the step on every
    # node; outside Slurm the training processes (in sessions of their own) are signalled here.
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        kill -USR1 "$HEADCT_CHILD" 2>/dev/null || true
    else
        headct_signal_tree USR1 "$HEADCT_CHILD"
    fi
}

_headct_on_term() {
    HEADCT_TERMINATED=1
    headct_log "got SIGTERM (cancelled, preempted or out of time): waiting for the run to checkpoint"
    # Under Slurm every process of the job step gets SIGTERM from Slurm itself; sending it again
    # would cut short torchrun's graceful shutdown. Outside Slurm the child is ours to signal.
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        kill -TERM "$HEADCT_CHILD" 2>/dev/null || true
    fi
}

# headct_main ENTRY_SCRIPT CONFIG [KEY VALUE ...]
# Run ENTRY_SCRIPT with torchrun on every node of the allocation; requeue on SIGUSR1.
headct_main() {
    local entry="$1"
    shift
    if [ $# -lt 1 ] || [ "${1:0:1}" = "-" ]; then
        headct_die "usage: sbatch [sbatch options] slurm_submit/<script>.sbatch CONFIG.yaml [KEY VALUE ...]
  CONFIG.yaml  a config file, e.g. one of: $(cd "$HEADCT_REPO" && ls configs/*/*.yaml 2>/dev/null | tr '\n' ' ')
  KEY VALUE    config overrides passed to --opts, e.g. OUTPUT runs/x DATA.BATCH_SIZE 16"
    fi
    cd "$HEADCT_REPO" || headct_die "cannot cd to $HEADCT_REPO"
    [ -f "$entry" ] || headct_die "$HEADCT_REPO/$entry does not exist (is HEADCT_REPO the repository root?)"
    local cfg
    cfg=$(headct_resolve_cfg "$1") || exit 2
    shift
    if [ $(($# % 2)) -ne 0 ]; then
        headct_die "config overrides must be KEY VALUE pairs; got an odd number: $*"
    fi
    headct_activate

    local nproc nnodes
    nproc=$(headct_nproc) || exit 2
    nnodes="${SLURM_NNODES:-1}"
    # torchrun: one launcher per node. Single node: a private rendezvous on a free port
    # (--standalone). Several nodes: c10d rendezvous hosted by the first node of the allocation.
    local -a run=("$HEADCT_PYTHON" -m torch.distributed.run --nnodes "$nnodes" --nproc_per_node "$nproc"
                  --max_restarts "${HEADCT_MAX_RESTARTS:-0}")
    if [ "$nnodes" -gt 1 ]; then
        local host port
        host=$(headct_first_host) || headct_die "scontrol show hostnames $SLURM_JOB_NODELIST failed"
        port="${HEADCT_RDZV_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 10000))}"
        run+=(--rdzv_backend c10d --rdzv_endpoint "$host:$port" --rdzv_id "${SLURM_JOB_ID:-headct}")
    else
        run+=(--standalone)
    fi
    # TRAIN.RESUME auto first, so that a requeued job continues from OUTPUT/checkpoint_last.pth;
    # the user's pairs come after it and win.
    run+=("$entry" --cfg "$cfg" --opts TRAIN.RESUME auto "$@")

    # torchrun ignores SIGUSR1 (the training processes handle it); started through bash so the
    # ignored disposition is set before torchrun runs, on every node.
    local -a cmd=(bash -c 'trap "" USR1; exec "$@"' headct-launch "${run[@]}")
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        local -a step=(srun --nodes "$nnodes" --ntasks "$nnodes" --ntasks-per-node 1 --kill-on-bad-exit=1)
        # srun no longer inherits --cpus-per-task from sbatch (Slurm 22.05): pass it on, or every
        # torchrun would be confined to one CPU.
        if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
            step+=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
        fi
        cmd=("${step[@]}" "${cmd[@]}")
    fi

    export PYTHONUNBUFFERED=1
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${HEADCT_SHUTDOWN_TIMEOUT:-300}"
    if [ -z "${OMP_NUM_THREADS:-}" ] && [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
        export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / nproc > 0 ? SLURM_CPUS_PER_TASK / nproc : 1 ))
    fi

    headct_log "job ${SLURM_JOB_ID:-(no Slurm)} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
        "$nnodes node(s) x $nproc process(es); repository $HEADCT_REPO; python $(command -v "$HEADCT_PYTHON")"
    headct_log "command: $(printf '%q ' "${cmd[@]}")"
    if [ "${HEADCT_DRY_RUN:-0}" = 1 ]; then
        return 0
    fi

    HEADCT_PREEMPTED=0
    HEADCT_TERMINATED=0
    trap _headct_on_usr1 USR1
    trap _headct_on_term TERM
    "${cmd[@]}" &
    HEADCT_CHILD=$!
    while kill -0 "$HEADCT_CHILD" 2>/dev/null; do
        wait "$HEADCT_CHILD" || true  # returns early (status > 128) whenever a trapped signal arrives
    done
    local rc=0
    wait "$HEADCT_CHILD" || rc=$?  # the shell keeps the status of its finished background job
    trap - USR1 TERM
    headct_log "run exited with status $rc"

    if [ "$rc" -ne 0 ] && [ "$HEADCT_PREEMPTED" = 1 ] && [ "$HEADCT_TERMINATED" = 0 ]; then
        if [ -z "${SLURM_JOB_ID:-}" ]; then
            headct_log "stopped on SIGUSR1; run the same command again to resume (TRAIN.RESUME auto)"
            return 3  # as the training script's own "checkpoint saved, start me again" status
        fi
        local restarts="${SLURM_RESTART_COUNT:-0}" max="${HEADCT_MAX_REQUEUES:-100}"
        if [ "$restarts" -ge "$max" ]; then
            headct_log "not requeueing: restart $restarts reached HEADCT_MAX_REQUEUES=$max"
            return "$rc"
        fi
        headct_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1))); it resumes from checkpoint_last.pth"
        scontrol requeue "$SLURM_JOB_ID" || { headct_log "scontrol requeue failed"; return "$rc"; }
        return 0
    fi
    return "$rc"
}

# headct_sweep ENTRY_SCRIPT CONFIG [KEY VALUE ...]
# One task of a job array: run headct_main with HEADCT_SWEEP_KEY set to the task's value among
# HEADCT_SWEEP_VALUES (space-separated; task i = SLURM_ARRAY_TASK_ID, or HEADCT_SWEEP_INDEX, takes
# value i) and OUTPUT set to a subfolder <OUTPUT>/<key>_<value> of the config's OUTPUT (see
# slurm_submit/sweep.py).
headct_sweep() {
    local entry="$1"
    shift
    [ $# -ge 1 ] || headct_main "$entry"  # prints the usage
    cd "$HEADCT_REPO" || headct_die "cannot cd to $HEADCT_REPO"
    local cfg index
    cfg=$(headct_resolve_cfg "$1") || exit 2
    shift
    index="${HEADCT_SWEEP_INDEX:-${SLURM_ARRAY_TASK_ID:-}}"
    [ -n "$index" ] || headct_die "not an array task: submit with sbatch --array=0-N (one task per value of \
HEADCT_SWEEP_VALUES='${HEADCT_SWEEP_VALUES:-}')"
    headct_activate
    local out
    out=$("$HEADCT_PYTHON" slurm_submit/sweep.py --key "${HEADCT_SWEEP_KEY:?set HEADCT_SWEEP_KEY}" \
        --values "${HEADCT_SWEEP_VALUES:?set HEADCT_SWEEP_VALUES}" --index "$index" --cfg "$cfg" --opts "$@") \
        || headct_die "sweep task $index: see the error above"
    local -a extra
    mapfile -t extra <<< "$out"
    headct_log "array task $index: ${extra[*]}"
    headct_main "$entry" "$cfg" "$@" "${extra[@]}"
}
