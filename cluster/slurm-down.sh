#!/usr/bin/env bash
# Stop the dev SLURM that cluster/slurm-up.sh started: cancel the dev cluster's jobs,
# then end only the daemons recorded in the state dir, by PID (SIGTERM, then SIGKILL after 10 s).
# Daemons this script did not start (e.g. a munged that was already running) are left alone.
# Idempotent: nothing recorded, nothing to do.
#
# Environment: EMSEG_SLURM_STATE  state dir used by slurm-up.sh  [/tmp/emseg-slurm]
set -euo pipefail

STATE=${EMSEG_SLURM_STATE:-/tmp/emseg-slurm}
CONF_DIR=/etc/slurm
MARK="# written by emseg cluster/slurm-up.sh"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=cluster/slurm-lib.sh
source "$HERE/slurm-lib.sh"
say() { echo "slurm-down: $*" >&2; }

if [[ ! -d $STATE/pids ]]; then
    say "nothing recorded in $STATE/pids; nothing to stop"
    exit 0
fi

# Jobs first, while slurmctld still runs: their slurmstepd processes are not children of slurmd
# and would outlive it.  Only the dev cluster's config is ours, so every job in it is ours.
if is_ours_alive slurmctld && grep -qF "$MARK" "$CONF_DIR/slurm.conf" 2>/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        say "cancelling jobs: ${jobs//$'\n'/ }"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for (( i = 0; i < 30; i++ )); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 1
        done
    fi
fi

stop() {   # stop NAME: SIGTERM the recorded PID, SIGKILL after 10 s (NAME as in slurm-lib.sh)
    local name=$1 command=${1%%@*} pid i
    pid=$(cat "$STATE/pids/$name" 2>/dev/null) || return 0
    if is_alive "$pid" "$command"; then
        kill -TERM "$pid" 2>/dev/null || true
        for (( i = 0; i < 100; i++ )); do
            is_alive "$pid" "$command" || break
            sleep 0.1
        done
        if is_alive "$pid" "$command"; then
            say "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        say "stopped $name (pid $pid)"
    fi
    rm -f "$STATE/pids/$name"
}
# Every slurmd recorded (one per node: slurmd@NODE), then the controller, then munged.
for record in "$STATE"/pids/slurmd*; do
    [[ -e $record ]] && stop "${record##*/}"
done
stop slurmctld
stop munged

# Put back configuration files that were there before slurm-up.sh.
for f in slurm.conf cgroup.conf gres.conf; do
    if grep -qF "$MARK" "$CONF_DIR/$f" 2>/dev/null; then rm -f "$CONF_DIR/$f"; fi
    if [[ -e $STATE/$f.orig ]]; then mv "$STATE/$f.orig" "$CONF_DIR/$f"; fi
done
rmdir "$STATE/pids" 2>/dev/null || true
