#!/usr/bin/env bash
# Stop the one-node Slurm cluster that .ci/slurm-up.sh started: slurmd, slurmctld, munged (by their pid files).
# Safe to run when nothing is up. Packages and /etc/slurm stay, so slurm-up.sh restarts quickly.
set -uo pipefail

stop_pidfile() {  # stop_pidfile NAME FILE: SIGTERM the daemon named in FILE, wait ≤ 15 s for it to exit
    local name=$1 file=$2 pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && { echo "slurm-down.sh: $name ($pid) still running; sending SIGKILL." >&2; kill -KILL "$pid"; }
    fi
    rm -f "$file"
}

# jobs first, so no slurmstepd is left behind holding CPUs
if command -v scancel >/dev/null && [[ -s /run/slurmctld.pid ]]; then
    timeout 10 scancel --user=root >/dev/null 2>&1 || true
fi
stop_pidfile slurmd /run/slurmd.pid
stop_pidfile slurmctld /run/slurmctld.pid
stop_pidfile munged /run/munge/munged.pid
echo "slurm-down.sh: Slurm daemons stopped."
