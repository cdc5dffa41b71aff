#!/usr/bin/env bash
# Start a real SLURM of EMSEG_SLURM_NODES compute nodes (munged, slurmctld, one slurmd per node) on
# this machine, for development and for emseg's `cluster` tests.  The nodes are separate slurmd
# daemons (slurmd -N NAME, a port each) named HOST-1, HOST-2, ...: SLURM schedules, runs, loses and
# replaces jobs on each as on separate machines, so a lost node can be tested on one host.  Debian 12
# as root; no systemd needed: the daemons are started as plain processes and their PIDs recorded, so
# cluster/slurm-down.sh ends exactly these.
#
#   cluster/slurm-up.sh          # install if needed, configure, start, wait until every node is idle
#   cluster/slurm-down.sh        # cancel the dev cluster's jobs and stop the daemons started here
#
# Idempotent: when the daemons recorded in the state dir are alive and every node is up, it returns.
#
# Environment:
#   EMSEG_SLURM_STATE    state dir: PIDs, spool, logs, job logs  [/tmp/emseg-slurm]
#   EMSEG_SLURM_NODES    compute nodes (slurmd daemons; the node-loss tests need 2)  [2]
#   EMSEG_SLURM_CPUS     CPU slots advertised per node (config_overrides)  [max(4, real CPUs)]
#   EMSEG_SLURM_TIMEOUT  seconds to wait for the nodes to be idle [90]
#   EMSEG_SLURM_PARTITION partition name                           [debug]
#   EMSEG_SLURM_GPUS     fake GPUs per node, advertised as gres gpu (device files are links to /dev/null):
#                        jobs can ask for --gres=gpu:N and get CUDA_VISIBLE_DEVICES, but no
#                        real device; enough to test GPU profiles on a machine without GPUs  [2]
#
# It writes /etc/slurm/slurm.conf and /etc/slurm/cgroup.conf (the paths every SLURM client reads);
# files there that this script did not write are kept aside in the state dir and put back by
# slurm-down.sh.
set -euo pipefail

STATE=${EMSEG_SLURM_STATE:-/tmp/emseg-slurm}
TIMEOUT=${EMSEG_SLURM_TIMEOUT:-90}
NODES=${EMSEG_SLURM_NODES:-2}
PARTITION=${EMSEG_SLURM_PARTITION:-debug}
CONF_DIR=/etc/slurm
MARK="# written by emseg cluster/slurm-up.sh"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=cluster/slurm-lib.sh
source "$HERE/slurm-lib.sh"

die() { echo "slurm-up: error: $*" >&2; exit 1; }
say() { echo "slurm-up: $*" >&2; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts system daemons); try: sudo $0"

# --- 1. install -------------------------------------------------------------------------------
PACKAGES=(slurmctld slurmd slurm-client munge)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurm/munge are not installed and apt-get is unavailable; install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} (apt, --no-install-recommends)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"/tmp/emseg-slurm-apt.log" 2>&1; then
        apt-get update -q >>"/tmp/emseg-slurm-apt.log" 2>&1 || true
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"/tmp/emseg-slurm-apt.log" 2>&1 \
            || { tail -n 20 /tmp/emseg-slurm-apt.log >&2; die "apt-get install ${PACKAGES[*]} failed (log: /tmp/emseg-slurm-apt.log)"; }
    fi
fi

[[ $NODES =~ ^[1-9][0-9]?$ ]] || die "EMSEG_SLURM_NODES=$NODES: expected a number of nodes from 1 to 99"
HOST=$(hostname -s)
NODE_NAMES=()
for (( i = 1; i <= NODES; i++ )); do NODE_NAMES+=("$HOST-$i"); done
NODE_LIST="$HOST-[1-$NODES]"
mkdir -p "$STATE"/{pids,slurmctld,slurmd,logs,jobs}
chmod 755 "$STATE" "$STATE/jobs"
chmod 1777 "$STATE/logs"

# --- 2. already up? -----------------------------------------------------------------------------
# node_states: "NAME STATE" per node of the dev cluster, sorted by name.
node_states() { sinfo -h -N -o "%N %T" 2>/dev/null | sort -u; }
all_up() {   # exactly this configuration's nodes are reported, each idle, mixed or allocated
    local states
    states=$(node_states) || return 1
    [[ $(cut -d' ' -f1 <<<"$states" | tr '\n' ' ') == "${NODE_NAMES[*]} " ]] \
        && ! grep -qvE " (idle|mixed|allocated)$" <<<"$states"
}
all_ours_alive() {
    local node
    is_ours_alive slurmctld || return 1
    for node in "${NODE_NAMES[@]}"; do is_ours_alive "slurmd@$node" || return 1; done
}
if all_ours_alive && grep -qF "$MARK" "$CONF_DIR/slurm.conf" 2>/dev/null && all_up; then
    say "already up (nodes $NODE_LIST; state in $STATE)"
    exit 0
fi
# Some of ours are alive but the cluster is not usable: restart from clean.
if ls "$STATE"/pids/* >/dev/null 2>&1; then
    say "restarting: a previous start left daemons in an unusable state"
    "$HERE/slurm-down.sh"
    mkdir -p "$STATE"/{pids,slurmctld,slurmd,logs,jobs}
fi
for daemon in slurmctld slurmd; do
    if pid=$(pgrep -x "$daemon" | head -n1) && [[ -n $pid ]] && ! is_zombie "$pid"; then
        die "a $daemon not started by this script is running (pid $pid); stop it first"
    fi
done

# --- 3. configuration -------------------------------------------------------------------------
# Topology from the hardware, with more CPU slots advertised than there are cores (config_overrides),
# so that a few one-core worker jobs and a 2-task training job fit at once.  RealMemory at ~95%:
# more than the real amount makes the node INVALID.
read -r REAL_CPUS REAL_MEM < <(slurmd -C | awk '
    /^NodeName/ { for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } print v["CPUs"], v["RealMemory"] }')
[[ -n ${REAL_CPUS:-} && -n ${REAL_MEM:-} ]] || die "could not read the node topology from 'slurmd -C'"
CPUS=${EMSEG_SLURM_CPUS:-$(( REAL_CPUS > 4 ? REAL_CPUS : 4 ))}
MEM=$(( REAL_MEM * 95 / 100 / NODES ))   # the nodes share this machine's memory
DEF_MEM=$(( MEM / CPUS < 1024 ? MEM / CPUS : 1024 ))
GPUS=${EMSEG_SLURM_GPUS:-2}
GRES=""
if (( GPUS > 0 )); then GRES="Gres=gpu:$GPUS"; fi

for f in slurm.conf cgroup.conf gres.conf; do
    if [[ -e $CONF_DIR/$f ]] && ! grep -qF "$MARK" "$CONF_DIR/$f"; then
        say "keeping the existing $CONF_DIR/$f aside as $STATE/$f.orig"
        mv "$CONF_DIR/$f" "$STATE/$f.orig"
    fi
done
mkdir -p "$CONF_DIR"
cat >"$CONF_DIR/slurm.conf" <<EOF
$MARK for the dev cluster; slurm-down.sh removes it.
ClusterName=emseg-dev
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
# One slurmd per node on this host: %n (the node name) keeps their spool, PID and log apart.
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/logs/slurmctld.log
SlurmdLogFile=$STATE/logs/slurmd-%n.log
# No cgroup enforcement: jobs are tracked through the process tree.  Simple and robust in containers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
# Short timings: cancelled jobs leave the queue quickly, finished ones are forgotten after 10 s.
KillWait=5
MinJobAge=10
SchedulerParameters=sched_interval=5
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
DefMemPerCPU=$DEF_MEM
GresTypes=gpu
# Node i's slurmd listens on port 6818 + i - 1.
NodeName=$NODE_LIST NodeHostname=$HOST NodeAddr=127.0.0.1 Port=6818-$(( 6818 + NODES - 1 )) CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM $GRES State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE_LIST Default=YES MaxTime=INFINITE State=UP
EOF
# Fake GPUs: profiles with gpus_per_job can be scheduled and tested on a machine without GPUs
# (a gres without File is reported as 0 by slurmd 22.05 and makes the node INVALID).
{
    echo "$MARK"
    for node in "${NODE_NAMES[@]}"; do
        mkdir -p "$STATE/dev/$node" "$STATE/slurmd/$node"
        for (( i = 0; i < GPUS; i++ )); do ln -sfn /dev/null "$STATE/dev/$node/nvidia$i"; done
        if (( GPUS > 0 )); then echo "NodeName=$node Name=gpu File=$STATE/dev/$node/nvidia[0-$(( GPUS - 1 ))]"; fi
    done
} >"$CONF_DIR/gres.conf"
# slurmd 22.05 always loads a cgroup plugin: 'disabled' is refused, cgroup/v2 is refused on hybrid mounts.
cat >"$CONF_DIR/cgroup.conf" <<EOF
$MARK
CgroupPlugin=autodetect
EOF

# --- 4. start the daemons -----------------------------------------------------------------------
# munged: reuse one that is already running (not ours, so slurm-down.sh leaves it alone).
if [[ -S /run/munge/munge.socket.2 ]] && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "using the munged already running"
else
    [[ -s /etc/munge/munge.key ]] || { say "creating /etc/munge/munge.key"; mungekey --create --keyfile=/etc/munge/munge.key; }
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
    rm -f /run/munge/munged.pid
    start_daemon munged "$STATE/logs/munged.out" /run/munge/munged.pid \
        setpriv --reuid=munge --regid=munge --init-groups munged --force
fi
rm -f "$STATE"/slurmctld.pid "$STATE"/slurmd*.pid
start_daemon slurmctld "$STATE/logs/slurmctld.out" "$STATE/slurmctld.pid" slurmctld -c
for node in "${NODE_NAMES[@]}"; do
    start_daemon "slurmd@$node" "$STATE/logs/slurmd-$node.out" "$STATE/slurmd-$node.pid" slurmd -N "$node"
done

# --- 5. wait until every node is idle -----------------------------------------------------------
deadline=$(( SECONDS + TIMEOUT ))
while :; do
    states=$(node_states || true)
    [[ $(grep -c " idle$" <<<"$states") -eq $NODES ]] && break
    if (( SECONDS >= deadline )); then
        echo "slurm-up: error: after ${TIMEOUT}s the nodes are not all idle: ${states//$'\n'/, }" >&2
        sinfo -R >&2 2>/dev/null || true
        for log in slurmctld "${NODE_NAMES[@]/#/slurmd-}"; do
            echo "--- last lines of $STATE/logs/$log.log" >&2; tail -n 15 "$STATE/logs/$log.log" >&2 2>/dev/null || true
        done
        echo "slurm-up: stop what was started with cluster/slurm-down.sh; EMSEG_SLURM_TIMEOUT raises the wait" >&2
        exit 1
    fi
    sleep 1
done
say "up: nodes $NODE_LIST idle, $CPUS CPU slots, ${MEM} MB and $GPUS fake GPU(s) each, partition '$PARTITION'; state and logs in $STATE"
