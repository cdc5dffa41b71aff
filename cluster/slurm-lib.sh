# shellcheck shell=bash
# Helpers shared by slurm-up.sh and slurm-down.sh (sourced; expects $STATE).
# A daemon is "ours" when its PID is recorded in $STATE/pids/NAME and /proc/PID/comm is still NAME
# (guards against PID reuse).  PID 1 here reaps orphans late, so a zombie's /proc entry can outlive
# it: the process state, not the existence of /proc/PID, decides whether it is alive.

# is_zombie PID: true when PID is gone, a zombie or dead.
is_zombie() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }            # fields after "(comm) "
    [[ ${stat:0:1} == Z || ${stat:0:1} == X ]]
}

# is_alive PID NAME: PID runs (not a zombie) and its command name is NAME.
is_alive() {
    [[ -n ${1:-} ]] || return 1
    ! is_zombie "$1" && [[ $(cat "/proc/$1/comm" 2>/dev/null) == "$2" ]]
}

# is_ours_alive NAME: the daemon recorded under NAME is alive.  NAME is the command name, or
# COMMAND@INSTANCE for one of several daemons of one command (slurmd@NODE: one slurmd per node).
is_ours_alive() {
    local pid
    pid=$(cat "$STATE/pids/$1" 2>/dev/null) || return 1
    is_alive "$pid" "${1%%@*}"
}

# start_daemon NAME OUTPUT PIDFILE CMD...: start a self-daemonizing CMD with every fd above 2
# closed and stdio on OUTPUT (a CI runner waiting on an inherited pipe would otherwise hang),
# wait for its PID file, and record the PID in $STATE/pids/NAME (NAME as for is_ours_alive).
start_daemon() {
    local name=$1 output=$2 pidfile=$3 fd pid i
    shift 3
    (
        for fd in "/proc/$BASHPID/fd/"*; do
            fd=${fd##*/}
            if (( fd > 2 )); then eval "exec $fd>&-" 2>/dev/null || true; fi
        done
        exec "$@"
    ) </dev/null >>"$output" 2>&1 || { echo "slurm-up: error: $name failed to start; see $output" >&2; tail -n 10 "$output" >&2; return 1; }
    for (( i = 0; i < 150; i++ )); do
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if is_alive "$pid" "${name%%@*}"; then
            echo "$pid" >"$STATE/pids/$name"
            return 0
        fi
        sleep 0.1
    done
    echo "slurm-up: error: $name did not write a live PID to $pidfile within 15 s; see $output and $STATE/logs" >&2
    tail -n 10 "$output" >&2 2>/dev/null || true
    return 1
}
