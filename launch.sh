#!/usr/bin/env bash
# Train on a SLURM cluster: submit, resize, preempt, requeue, resume.
#
#   ./launch.sh [sbatch options] CONFIG [dotted.overrides ...]     submit a job
#   sbatch [sbatch options] launch.sh CONFIG [overrides ...]       the same, by hand
#
# Run outside a job, launch.sh submits itself with sbatch (sbatch options given before
# CONFIG, in --option=value form, are passed on). Run by SLURM as the batch script, it
# starts one `srun` task per node, each running
#   torchrun --nnodes=$SLURM_NNODES --nproc_per_node=<GPUs per node> --rdzv_backend=c10d
#            --rdzv_endpoint=<first node>:<port> train_ddp.py --config CONFIG run_dir=RUN_DIR overrides...
# RUN_DIR defaults to runs/<job name>-<job id>; the job id survives a requeue, so a
# requeued job finds its checkpoints there and train_ddp.py resumes from the newest one.
#
# Resources: the #SBATCH lines below are the defaults; sbatch options, SBATCH_* variables
# (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...) and these variables override
# them (read when ./launch.sh submits):
#   NODES=1  GPUS_PER_NODE=8  CPUS_PER_TASK=32 (per node)  TIME_LIMIT=24:00:00
#   JOB_NAME=musicbert  SIGNAL_SECONDS=300 (warning before the time limit)
#   MUSICBERT_CPU=1 or GPUS_PER_NODE=0: CPU mode (no GPUs requested, gloo, one process
#       per CPU of the task unless NPROC_PER_NODE says otherwise)
# Read in the job (set them at submission; the job inherits the environment):
#   RUN_DIR (default $RUNS_ROOT/<job name>-<job id>, RUNS_ROOT=runs), NPROC_PER_NODE,
#   PYTHON (default: .venv/bin/python if present, else torchrun/python3 on PATH),
#   TORCHRUN (command to use instead of "$PYTHON -m torch.distributed.run"),
#   RDZV_HOST / RDZV_PORT (default: first node, 29500 + job id % 10000),
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120 (s torchrun lets workers checkpoint before SIGKILL),
#   TRAIN_SCRIPT (default train_ddp.py; tests use a stand-in with the same contract)
#
# Preemption: SLURM sends USR1 to this script SIGNAL_SECONDS before the time limit
# (--signal=B:USR1@...), or `scancel --batch --signal=USR1 JOBID` does it by hand. The
# trap makes every node's torchrun get SIGTERM (torchrun forwards SIGTERM, not USR1, to
# its workers), waits for train_ddp.py to checkpoint and exit, then `scontrol requeue`s
# the job unless RUN_DIR/COMPLETE says the run reached train.max_steps. The requeued job
# (same id, same RUN_DIR, SLURM_RESTART_COUNT=1, 2, ...) resumes from the checkpoint.
# A plain `scancel JOBID` (SIGTERM) cancels for good: no requeue.
#
#SBATCH --job-name=musicbert
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm-%x-%j.out
set -uo pipefail

log() { echo "[launch.sh $(date -u +%H:%M:%S)] $*"; }
die() { echo "launch.sh: $*" >&2; exit 2; }

cpu_mode() { [[ ${MUSICBERT_CPU:-0} == 1 || ${GPUS_PER_NODE:-} == 0 ]]; }

usage() {
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 64
}

# --------------------------------------------------------------------------- submit
submit() {
    local repo sbatch_opts=()
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    while [[ $# -gt 0 && $1 == -* ]]; do
        [[ $1 == -h || $1 == --help ]] && usage
        sbatch_opts+=("$1")
        shift
    done
    [[ $# -ge 1 ]] || usage
    local config=$1
    shift
    [[ -f $config ]] || die "config file not found: $config"
    config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
    command -v sbatch >/dev/null || die "sbatch not found: is this a SLURM login node?"

    # Environment variables first, so that explicit sbatch options (later) win.
    local opts=(--chdir="$repo")
    [[ -n ${NODES:-} ]] && opts+=(--nodes="$NODES")
    [[ -n ${CPUS_PER_TASK:-} ]] && opts+=(--cpus-per-task="$CPUS_PER_TASK")
    [[ -n ${TIME_LIMIT:-} ]] && opts+=(--time="$TIME_LIMIT")
    [[ -n ${JOB_NAME:-} ]] && opts+=(--job-name="$JOB_NAME")
    [[ -n ${SIGNAL_SECONDS:-} ]] && opts+=(--signal="B:USR1@$SIGNAL_SECONDS")
    if cpu_mode; then
        export MUSICBERT_CPU=1
        opts+=(--gres=none)
    elif [[ -n ${GPUS_PER_NODE:-} ]]; then
        opts+=(--gres="gpu:$GPUS_PER_NODE")
    fi
    # The default --output is relative to the job's working directory (the repository).
    mkdir -p "$repo/runs"
    export MUSICBERT_REPO=$repo
    exec sbatch "${opts[@]}" "${sbatch_opts[@]}" "$repo/launch.sh" "$config" "$@"
}

# --------------------------------------------------------------------------- run (in the job)
# Each node's srun task: start torchrun in the background, turn SIGURG into a SIGTERM
# for torchrun alone (SLURM signals every process of a step; URG is ignored by default,
# so only this shell reacts), and exit 0 after a requested stop so that srun's
# --kill-on-bad-exit does not kill another node that is still writing its checkpoint.
# (torchrun given SIGTERM forwards it to its workers, which checkpoint and exit 0, and then
# exits 1 itself with a "SignalException ... got signal: 15" traceback: after a stop that
# was asked for, that 1 is expected and not a failure.)
# shellcheck disable=SC2016
NODE_TASK='
stopping=0
forward() { if [[ $stopping == 0 ]]; then stopping=1; kill -TERM "$child" 2>/dev/null; fi; }
trap forward URG
trap "stopping=1" TERM   # SLURM signals torchrun itself (time limit, scancel): just wait
"$@" &
child=$!
while true; do
    wait "$child"; rc=$?
    kill -0 "$child" 2>/dev/null || break
done
if [[ $stopping == 1 ]]; then exit 0; fi
exit "$rc"
'

# ---- the batch job: small steps, called in order by run_job below

# Sets RUN_DIR_OF_JOB: stable across requeues (the job id is kept); a run_dir= override wins.
resolve_run_dir() {
    RUN_DIR_OF_JOB=${RUN_DIR:-${RUNS_ROOT:-runs}/${SLURM_JOB_NAME:-musicbert}-${SLURM_JOB_ID}}
    local arg
    for arg in "$@"; do
        [[ $arg == run_dir=* ]] && RUN_DIR_OF_JOB=${arg#run_dir=}
    done
    mkdir -p "$RUN_DIR_OF_JOB"
}

# The SLURM log, findable from the run dir.
link_slurm_log() {
    local out
    out=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p')
    [[ -n $out && -e $out ]] && ln -sfn "$out" "$1/slurm-$SLURM_JOB_ID.out"
    return 0
}

# Sets the array TORCHRUN_CMD: which python / torchrun.
pick_torchrun() {
    local repo=$1 python=${PYTHON:-}
    if [[ -z $python && -x $repo/.venv/bin/python ]]; then python=$repo/.venv/bin/python; fi
    if [[ -n ${TORCHRUN:-} ]]; then
        read -r -a TORCHRUN_CMD <<<"$TORCHRUN"
    elif [[ -n $python ]]; then
        TORCHRUN_CMD=("$python" -m torch.distributed.run)
    elif command -v torchrun >/dev/null; then
        TORCHRUN_CMD=(torchrun)
    else
        TORCHRUN_CMD=(python3 -m torch.distributed.run)
    fi
}

# Sets NPROC: processes per node, the GPUs on the node, or CPUs in CPU mode.
procs_per_node() {
    if cpu_mode; then
        NPROC=${NPROC_PER_NODE:-${SLURM_CPUS_PER_TASK:-1}}
        export CUDA_VISIBLE_DEVICES=""
    else
        NPROC=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE:-}}}
        if [[ -z $NPROC && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
            NPROC=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
        fi
        [[ -n $NPROC && $NPROC -gt 0 ]] || die "no GPUs in this job (use GPUS_PER_NODE=0 or MUSICBERT_CPU=1 for CPU mode)"
    fi
}

# Runs srun "$@" (the node tasks) and returns its status. Signals reach a bash trap only while
# bash waits: srun runs in the background and the loop waits in short sleeps, so that it can
# also repeat the stop request. Sets preempted / cancelled for finish_job.
run_steps() {
    preempted=0 cancelled=0 last_stop=-1000
    # shellcheck disable=SC2317  # trap handlers
    on_usr1() {
        [[ $preempted == 1 ]] && return
        preempted=1
        log "preemption warning (USR1): asking train_ddp.py to checkpoint and stop"
    }
    # shellcheck disable=SC2317
    on_term() {
        cancelled=1
        log "SIGTERM (scancel or time limit): waiting for train_ddp.py to stop; no requeue"
    }
    trap on_usr1 USR1
    trap on_term TERM

    srun "$@" &
    local srun_pid=$! sleep_pid
    while kill -0 "$srun_pid" 2>/dev/null; do
        if [[ $preempted == 1 && $cancelled == 0 ]] && ((SECONDS - last_stop >= 20)); then
            # URG to every process of the job's steps (not this batch shell); only the node
            # tasks' shells react, each sending SIGTERM to its torchrun (once). Repeated
            # every 20 s in case a node's task had not started yet. Failing that, SIGTERM to
            # every process of the steps, as at a time limit.
            last_stop=$SECONDS
            scancel --signal=URG "$SLURM_JOB_ID" || scancel --signal=TERM "$SLURM_JOB_ID"
        fi
        sleep 1 &
        sleep_pid=$!
        wait "$sleep_pid" 2>/dev/null || kill "$sleep_pid" 2>/dev/null
    done
    wait "$srun_pid"
}

# Exits the job: 0 when the run completed (COMPLETE changed) or was requeued after a
# preemption warning, 3 when the requeue failed, else the training's status.
finish_job() {
    local rc=$1 run_dir=$2 complete_before=$3
    if [[ -e $run_dir/COMPLETE && $(complete_stamp "$run_dir") != "$complete_before" ]]; then
        log "run complete: $run_dir/COMPLETE"
        exit 0
    fi
    if [[ $preempted == 1 && $cancelled == 0 ]]; then
        log "requeueing job $SLURM_JOB_ID; it will resume from the newest checkpoint in $run_dir"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        log "scontrol requeue failed (job submitted with --no-requeue?)"
        exit 3
    fi
    if [[ $cancelled == 1 ]]; then
        log "stopped by SIGTERM; not requeued"
    elif [[ $rc == 0 ]]; then
        log "train_ddp.py finished (nothing left to do in $run_dir)"
    else
        log "train_ddp.py failed (status $rc)"
    fi
    exit "$rc"
}

run_job() {
    [[ $# -ge 1 ]] || die "usage: sbatch launch.sh CONFIG [overrides...]"
    local repo=${MUSICBERT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$repo" || die "cannot cd to $repo"
    local config=$1
    shift
    [[ -f $config ]] || die "config file not found: $config (relative paths are from $repo)"
    resolve_run_dir "$@"
    local run_dir=$RUN_DIR_OF_JOB
    log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}; run dir $run_dir"
    local train_script=${TRAIN_SCRIPT:-train_ddp.py}
    [[ -f $train_script ]] || die "$train_script not found in $repo: submit from the repository root (or with ./launch.sh)"
    link_slurm_log "$run_dir"
    # COMPLETE as it was before this run: a run already complete is train_ddp.py's to
    # recognise (it exits at once, or continues when train.max_steps was raised).
    local complete_before
    complete_before=$(complete_stamp "$run_dir")

    pick_torchrun "$repo"
    procs_per_node
    local nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    local host=${RDZV_HOST:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    local port=${RDZV_PORT:-$((29500 + SLURM_JOB_ID % 10000))}
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
    if [[ -z ${OMP_NUM_THREADS:-} && -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        export OMP_NUM_THREADS=$((SLURM_CPUS_PER_TASK / NPROC > 0 ? SLURM_CPUS_PER_TASK / NPROC : 1))
    fi
    local cmd=("${TORCHRUN_CMD[@]}" --nnodes="$nnodes" --nproc_per_node="$NPROC"
        --rdzv_backend=c10d --rdzv_endpoint="$host:$port" --rdzv_id="$SLURM_JOB_ID"
        --max_restarts=0
        "$train_script" --config "$config" run_dir="$run_dir" "$@")
    local srun_opts=(--nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
    # Slurm 22.05 steps do not inherit --cpus-per-task from the job: say it again.
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    log "srun ${srun_opts[*]} ${cmd[*]}"

    local rc=0
    run_steps "${srun_opts[@]}" bash -c "$NODE_TASK" node-task "${cmd[@]}" || rc=$?
    log "training processes exited with status $rc"
    finish_job "$rc" "$run_dir" "$complete_before"
}

complete_stamp() {  # what RUN_DIR/COMPLETE is now: mtime and content ("" if absent)
    [[ -e $1/COMPLETE ]] && { stat -c %y "$1/COMPLETE"; cat "$1/COMPLETE"; } 2>/dev/null
    return 0
}

if [[ -n ${SLURM_JOB_ID:-} ]]; then
    run_job "$@"
else
    submit "$@"
fi
