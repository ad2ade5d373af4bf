#!/usr/bin/env bash
# A throw-away SLURM on this machine (one node, or several emulated), for testing launch.sh.
#
#   scripts/slurm_local.sh install        apt-get install slurm-wlm munge if missing (root)
#   scripts/slurm_local.sh start [DIR]    write DIR/slurm.conf, start munged, slurmctld, slurmd
#   scripts/slurm_local.sh stop  [DIR]    cancel its jobs, stop the daemons it started
#   scripts/slurm_local.sh status [DIR]   sinfo + squeue of that cluster
#
# SLURM_LOCAL_NODES=N (default 1) emulates N nodes (node1..nodeN, one slurmd each, all on
# 127.0.0.1, sharing the CPUs; their names do not resolve, so give launch.sh
# RDZV_HOST=127.0.0.1); SLURM_LOCAL_GPUS=G declares G fake GPUs per node (GRES backed by
# empty files: jobs see SLURM_GPUS_ON_NODE as on a GPU node; there is no GPU).
#
# DIR (default $SLURM_LOCAL_DIR, else ${TMPDIR:-/tmp}/musicbert-slurm) holds everything:
# configuration, state, spool, logs, PID files and a private munge socket, so nothing
# under /etc or /var is touched and a system SLURM or munge (if any) is left alone.
# Clients find this cluster through SLURM_CONF; `start` prints the line to export:
#
#   eval "$(scripts/slurm_local.sh start /tmp/slurm)"    # sets SLURM_CONF
#   sbatch ... ; squeue ; scripts/slurm_local.sh stop /tmp/slurm
#
# `stop` stops only the PIDs in DIR's PID files (after checking each is still the
# daemon it started), never daemons by name. Needs root (slurmd runs jobs as any user).
#
# Set-up choices (measured on Debian 12 / Slurm 22.05): the daemons are started as
# /usr/sbin/slurmctld and /usr/sbin/slurmd, not the *-wlm names (GRES got dropped under
# those); no cgroups (proctrack/linuxproc, task/none), so it works in containers;
# AuthInfo cred_expire=5 and a 2 s scheduler interval let a requeued job start again in
# ~7 s instead of ~2 min.
set -euo pipefail

SLURMCTLD=${SLURMCTLD:-/usr/sbin/slurmctld}
SLURMD=${SLURMD:-/usr/sbin/slurmd}
MUNGED=${MUNGED:-/usr/sbin/munged}
MUNGE_KEY=${MUNGE_KEY:-/etc/munge/munge.key}
START_TIMEOUT=${SLURM_LOCAL_START_TIMEOUT:-60}

log() { echo "slurm_local: $*" >&2; }
die() { log "$*"; exit 1; }

state_dir() {
    local dir=${1:-${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/musicbert-slurm}}
    mkdir -p "$dir"
    (cd "$dir" && pwd)
}

have_slurm() {
    [[ -x $SLURMCTLD && -x $SLURMD && -x $MUNGED ]] && command -v sbatch >/dev/null && [[ -r $MUNGE_KEY ]]
}

cmd_install() {
    if have_slurm; then
        log "SLURM and munge already installed ($(sbatch --version))"
        return 0
    fi
    if [[ $(id -u) -ne 0 ]]; then
        log "cannot install slurm-wlm and munge: not root"
        exit 2
    fi
    if ! command -v apt-get >/dev/null; then
        log "cannot install slurm-wlm and munge: no apt-get"
        exit 2
    fi
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    local out
    out=$(mktemp)
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; } >"$out" 2>&1; then
        tail -n 30 "$out" >&2
        rm -f "$out"
        die "apt-get install slurm-wlm munge failed"
    fi
    rm -f "$out"
    have_slurm || die "installed, but $SLURMCTLD, $SLURMD, $MUNGED, sbatch or $MUNGE_KEY is missing"
    log "installed $(sbatch --version)"
}

port_free() {
    # True when nothing listens on 127.0.0.1:$1.
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# pid_alive FILE EXE: the PID in FILE is running EXE.
pid_alive() {
    local file=$1 exe=$2 pid
    [[ -s $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # /proc/PID/exe needs root for other users' processes; fall back to the command line.
    local real
    real=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
    if [[ -n $real ]]; then
        [[ $real == "$(readlink -f "$exe")" ]]
    else
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$(basename "$exe")"
    fi
}

wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds (false after SECONDS)
    local limit=$1
    shift
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

write_conf() {
    local dir=$1 ctld_port=$2 d_port=$3 nodes=$4 gpus=$5
    local host node_line cpus mem
    host=$(hostname -s)
    # The real CPU and memory layout, as slurmd sees it (first line of `slurmd -C`).
    node_line=$("$SLURMD" -C | head -n 1)
    [[ $node_line == NodeName=* ]] || die "unexpected output from $SLURMD -C: $node_line"
    node_line=${node_line#NodeName=* }
    local names=$host node_opts="NodeAddr=127.0.0.1"
    if ((nodes > 1)); then
        # Emulated nodes node1..nodeN: one slurmd each (-N name, own port), all on this
        # machine, sharing its CPUs and memory out between them.
        cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")
        mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
        cpus=$((cpus / nodes > 0 ? cpus / nodes : 1))
        node_line="CPUs=$cpus RealMemory=$((mem / nodes))"
        names="node[1-$nodes]"
        node_opts+=" NodeHostname=$host Port=$d_port-$((d_port + nodes - 1))"
    fi
    local gres_types="" gres=""
    if ((gpus > 0)); then
        # Fake GPUs: GRES backed by empty files. Jobs get SLURM_GPUS_ON_NODE, but there is
        # no GPU behind them.
        mkdir -p "$dir/fake-gpus"
        local i
        for ((i = 0; i < gpus; i++)); do : >"$dir/fake-gpus/gpu$i"; done
        gres_types="GresTypes=gpu"
        gres="Gres=gpu:$gpus"
        echo "NodeName=$names Name=gpu File=$dir/fake-gpus/gpu[0-$((gpus - 1))]" >"$dir/gres.conf"
    fi
    cat >"$dir/slurm.conf" <<EOF
# Written by scripts/slurm_local.sh start; everything it uses lives in $dir.
ClusterName=musicbert-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/slurmd-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
KillWait=30
MinJobAge=600
$gres_types
NodeName=$names $node_line $node_opts $gres State=UNKNOWN
PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP
EOF
}

cmd_start() {
    local dir
    dir=$(state_dir "${1:-}")
    [[ $(id -u) -eq 0 ]] || die "start needs root"
    have_slurm || die "SLURM or munge not installed: run '$0 install' first"
    if pid_alive "$dir/slurmctld.pid" "$SLURMCTLD"; then
        log "already running in $dir"
        echo "export SLURM_CONF=$dir/slurm.conf"
        return 0
    fi
    local nodes=${SLURM_LOCAL_NODES:-1} gpus=${SLURM_LOCAL_GPUS:-0}
    [[ $nodes =~ ^[1-9][0-9]*$ && $gpus =~ ^[0-9]+$ ]] || die "SLURM_LOCAL_NODES / SLURM_LOCAL_GPUS must be numbers"
    # munged checks that its directories are not writable by others and that the key
    # belongs to the user it runs as; the state dir must be traversable by that user.
    chmod 755 "$dir"
    mkdir -p "$dir/munge" "$dir/ctld"
    chown munge:munge "$dir/munge"
    chmod 755 "$dir/munge"  # munged wants the socket dir searchable by all, writable by it only

    # slurmctld on one port, the slurmd(s) on the next ones: find a free run of them.
    local ctld_port=${SLURM_LOCAL_PORT:-6817}
    if [[ -z ${SLURM_LOCAL_PORT:-} ]]; then
        local p free
        while true; do
            free=1
            for ((p = ctld_port; p <= ctld_port + nodes; p++)); do
                port_free "$p" || { free=0; break; }
            done
            ((free)) && break
            ctld_port=$((ctld_port + nodes + 1))
            ((ctld_port < 7817)) || die "no $((nodes + 1)) free ports between 6817 and 7817"
        done
    fi
    write_conf "$dir" "$ctld_port" $((ctld_port + 1)) "$nodes" "$gpus"

    log "starting munged"
    # runuser (util-linux) or setpriv: run as the munge user, which owns the key.
    local as_munge=(runuser -u munge --)
    command -v runuser >/dev/null || as_munge=(setpriv --reuid=munge --regid=munge --init-groups)
    "${as_munge[@]}" "$MUNGED" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed" --key-file="$MUNGE_KEY" \
        || die "munged failed to start; see $dir/munge/munged.log"
    wait_for 10 test -S "$dir/munge/munge.socket" || die "munged socket did not appear"

    export SLURM_CONF=$dir/slurm.conf
    log "starting slurmctld (port $ctld_port)"
    "$SLURMCTLD" -f "$SLURM_CONF" || die "slurmctld failed to start; see $dir/slurmctld.log"
    wait_for "$START_TIMEOUT" scontrol ping || die "slurmctld does not answer; see $dir/slurmctld.log"
    if ((nodes > 1)); then
        local i
        for ((i = 1; i <= nodes; i++)); do
            log "starting slurmd for node$i"
            "$SLURMD" -f "$SLURM_CONF" -N "node$i" || die "slurmd failed to start; see $dir/slurmd-node$i.log"
        done
    else
        log "starting slurmd"
        "$SLURMD" -f "$SLURM_CONF" || die "slurmd failed to start; see $dir/slurmd-$(hostname -s).log"
    fi
    node_idle() { [[ $(sinfo -h -N -o %t | grep -cx 'idle') -eq $nodes ]]; }
    wait_for "$START_TIMEOUT" node_idle || {
        sinfo -N -l >&2 || true
        die "not all nodes became idle; see the logs in $dir"
    }
    log "up: $(sinfo -h -N -o '%N %t cpus=%c mem=%m gres=%G' | tr '\n' ' ')"
    echo "export SLURM_CONF=$dir/slurm.conf"
}

stop_pidfile() {  # stop_pidfile FILE EXE NAME
    local file=$1 exe=$2 name=$3 pid
    if ! pid_alive "$file" "$exe"; then
        [[ -e $file ]] && log "$name not running (stale $file)"
        return 0
    fi
    pid=$(<"$file")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name did not stop, killing pid $pid"
        kill -KILL "$pid" 2>/dev/null || true
    fi
}

cmd_stop() {
    local dir
    dir=$(state_dir "${1:-}")
    [[ -e $dir/slurm.conf ]] || { log "nothing to stop in $dir"; return 0; }
    export SLURM_CONF=$dir/slurm.conf
    # Cancel this cluster's jobs first, so no slurmstepd or job process is left behind.
    if pid_alive "$dir/slurmctld.pid" "$SLURMCTLD"; then
        local jobs
        jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            log "cancelling jobs: ${jobs//$'\n'/ }"
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs 2>/dev/null || true
            local deadline=$((SECONDS + 40))
            while [[ -n $(timeout 10 squeue -h -o %i 2>/dev/null || true) ]] && ((SECONDS < deadline)); do
                sleep 0.5
            done
        fi
    fi
    local pidfile name
    for pidfile in "$dir"/slurmd-*.pid; do
        [[ -e $pidfile ]] || continue
        name=${pidfile##*/}
        stop_pidfile "$pidfile" "$SLURMD" "${name%.pid}"
    done
    stop_pidfile "$dir/slurmctld.pid" "$SLURMCTLD" slurmctld
    stop_pidfile "$dir/munge/munged.pid" "$MUNGED" munged
}

cmd_status() {
    local dir
    dir=$(state_dir "${1:-}")
    export SLURM_CONF=$dir/slurm.conf
    sinfo -N -l
    squeue
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start "${2:-}" ;;
    stop) cmd_stop "${2:-}" ;;
    status) cmd_status "${2:-}" ;;
    *)
        sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 64
        ;;
esac
