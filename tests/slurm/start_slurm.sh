#!/usr/bin/env bash
# Start a single-node Slurm "cluster" on this host (Debian/Ubuntu, as root, no systemd needed):
# munged + slurmctld + slurmd, one CPU-only partition "cpu", no gres, no accounting database.
# The node is this host; jobs run as the submitting user. Used by tests/pipeline/test_slurm.py.
#
#   sudo bash tests/slurm/start_slurm.sh           # install (apt) if needed, configure, start, wait for idle
#   bash tests/slurm/start_slurm.sh --stop         # stop the daemons this script started
#
# Without an accounting database `sacct` cannot answer, so the Snakemake Slurm executor must be
# told to query job states with `squeue` (status_command: squeue in the test profile); for that to
# see finished jobs, MinJobAge keeps them in slurmctld's memory for an hour.
set -euo pipefail

CONF_DIR=${SLURM_CONF_DIR:-/etc/slurm}
STATE=${SLURM_STATE_DIR:-/var/spool/slurm-glrs}
LOGS=${SLURM_LOG_DIR:-/var/log/slurm-glrs}
RUN=${SLURM_RUN_DIR:-/run/slurm-glrs}

alive() {  # the daemon whose pid file is $1 is running
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop() {
    for f in "$RUN"/slurmd.pid "$RUN"/slurmctld.pid "$RUN"/munged.pid; do
        if alive "$f"; then
            pid=$(cat "$f")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 100); do  # slurmctld saves its state before it exits
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.2
            done
        fi
        rm -f "$f"
    done
}

if [[ ${1:-} == --stop ]]; then
    stop
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "start_slurm.sh: must run as root (it installs packages and starts daemons)" >&2
    exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -q slurm-wlm munge >/dev/null
fi

mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$LOGS" "$RUN" /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge

# ---- munge -------------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    # --stop ends munged only if this script started it
    cp /run/munge/munged.pid "$RUN/munged.pid" 2>/dev/null || true
fi
munge -n | unmunge >/dev/null || { echo "start_slurm.sh: munged did not start (see /var/log/munge/munged.log)" >&2; exit 1; }

# ---- slurm.conf --------------------------------------------------------------------------------
HOST=$(hostname -s)
# What slurmd itself detects (CPUs, sockets, cores, threads, memory), so that the node is not drained
# for a mismatch; memory a little below the detected value.
HW=$(slurmd -C | head -1)
CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$HW")
BOARDS=$(sed -n 's/.*Boards=\([0-9]*\).*/\1/p' <<<"$HW")
SOCKETS=$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$HW")
CORES=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$HW")
THREADS=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$HW")
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
MEM=$(( MEM * 9 / 10 ))

cat > "$CONF_DIR/slurm.conf" <<CONF
# Written by glrs tests/slurm/start_slurm.sh: one node, CPU only, no accounting.
ClusterName=glrs
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=3600
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName=$HOST CPUs=$CPUS Boards=$BOARDS SocketsPerBoard=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
# Debian's slurm looks at /etc/slurm/slurm.conf; point the tools at a non-default directory too.
export SLURM_CONF="$CONF_DIR/slurm.conf"

# ---- daemons -----------------------------------------------------------------------------------
if ! alive "$RUN/slurmctld.pid"; then
    /usr/sbin/slurmctld -i    # -i: ignore state left by an earlier run with another config
fi
if ! alive "$RUN/slurmd.pid"; then
    /usr/sbin/slurmd
fi

for _ in $(seq 60); do
    state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null || true)
    case $state in
        idle*|mixed*|allocated*) echo "slurm is up: node $HOST $state ($CPUS CPUs, ${MEM} MB), partition cpu"; exit 0 ;;
        down*|drain*|fail*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
done
echo "start_slurm.sh: node $HOST never became idle (state: ${state:-none}); logs:" >&2
tail -n 20 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
exit 1
