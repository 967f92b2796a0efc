#!/usr/bin/env bash
# Bring up a real one-node Slurm cluster on this machine for the SLURM tests (tests/test_launch_slurm.py):
# Debian's slurmctld + slurmd + slurm-client + munge, a slurm.conf written for this host, daemons started as root.
# Idempotent: a second call finds the cluster up and returns at once. Stop it with .ci/slurm-down.sh.
#
# No systemd is assumed (containers): the daemons are started directly and daemonize themselves.
# No cgroups either: proctrack/linuxproc + task/none (slurm.conf(5)), so no cgroup.conf is needed.
# No slurmdbd: sacct has no accounting storage, so tests read job state from `scontrol show job`
# (kept MinJobAge seconds after the end) and the job log.
set -euo pipefail

[[ $(id -u) == 0 ]] || { echo "slurm-up.sh: run as root (it installs packages and starts daemons)." >&2; exit 1; }

NODE=$(hostname -s)
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
export DEBIAN_FRONTEND=noninteractive

cluster_ready() {
    # the node answers and is schedulable (idle, or mixed/alloc when a job from an earlier run still holds it)
    command -v sinfo >/dev/null 2>&1 || return 1
    local state
    state=$(timeout 10 sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1) || return 1
    [[ $state == idle || $state == mixed || $state == allocated ]]
}

if cluster_ready; then
    echo "slurm-up.sh: cluster already up (node $NODE $(sinfo -h -n "$NODE" -o '%T'))."
    exit 0
fi

# --- 1. packages (once) ---------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    echo "slurm-up.sh: installing slurmctld slurmd slurm-client munge ..."
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# --- 2. munge: a key and the daemon (runs as the munge user, as Debian's unit does) -----------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null || { echo "slurm-up.sh: munged did not start (see /var/log/munge/munged.log)." >&2; exit 1; }
fi

# --- 3. slurm.conf for this one machine -----------------------------------------------------------------
CPUS=$(nproc)
MEM_MB=$(free -m | awk '/^Mem:/ {print $2}')
REAL_MEM=$(( MEM_MB * 9 / 10 ))  # a bit under the total: slurmd drains a node whose RealMemory exceeds what it finds
install -d -m 0755 "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
cat > "$CONF_DIR/slurm.conf.new" <<EOF
# Written by .ci/slurm-up.sh: a one-node cluster on $NODE for the CI's SLURM tests.
ClusterName=gpt2forge
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again after the credential lifetime (default 120 s); 10 s keeps preemption tests short
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
# no cgroups in a container: track processes by parent pid, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# preemption tests requeue jobs (scontrol requeue), and a node comes back by itself after a restart
JobRequeue=1
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# look at pending (e.g. requeued) jobs every 5 s instead of every 30-60 s
SchedulerParameters=sched_interval=5,bf_interval=5
# keep finished jobs visible to 'scontrol show job' for 10 minutes (there is no slurmdbd for sacct)
MinJobAge=600
KillWait=30
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"

# --- 4. daemons -------------------------------------------------------------------------------------------
pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if pid_alive /run/slurmctld.pid; then
    scontrol reconfigure >/dev/null 2>&1 || true
else
    slurmctld  # daemonizes; -c would discard saved state, which the requeue of a pending job needs
fi
pid_alive /run/slurmd.pid || slurmd

# --- 5. wait until the node is idle (≤ 60 s) -------------------------------------------------------------
for i in $(seq 60); do
    if cluster_ready; then
        echo "slurm-up.sh: cluster up after ${i}s: $(sinfo -h -o '%P %D %T %c CPUs' | head -n1)."
        exit 0
    fi
    state=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true)
    # a node left down/drained by an earlier run: put it back in service
    if [[ $state == down* || $state == drain* ]]; then
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 1
done
echo "slurm-up.sh: node $NODE is not idle after 60 s (sinfo: $(sinfo -h 2>&1 | head -n3));" \
     "see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log." >&2
exit 1
