#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests and trying the templates:
#
#   slurm/cluster.sh start     install Debian's slurm-wlm and munge if missing (as root), start munged,
#                              slurmctld and slurmd, wait until the node is idle; does nothing if it runs
#   slurm/cluster.sh stop      stop what start started
#   slurm/cluster.sh env       print `export SLURM_CONF=...` for the clients (sbatch, scontrol, srun)
#
# Everything lives in $DYNASCOPE_SLURM_DIR (default /tmp/dynascope-slurm): the config, state, logs and
# the job-completion log (no accounting database: `sacct` has nothing, `scontrol show job` and
# jobcomp.log do). Settings known to work in containers: proctrack/linuxproc, task/none,
# select/cons_tres, JobRequeue=1. Finished jobs stay visible to `scontrol show job` for 10 minutes.
# A requeued job waits for its old credential to expire before it starts again: 10 s here
# (AuthInfo=cred_expire), 120 s by default.
set -euo pipefail

DIR=${DYNASCOPE_SLURM_DIR:-/tmp/dynascope-slurm}
CONF=$DIR/slurm.conf
HOST=$(hostname -s)

running() {  # a daemon started from $DIR, still alive
  [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null
}

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || { echo "cluster.sh: slurm-wlm and munge are missing; install them as root" >&2; exit 1; }
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
}

configure() {
  mkdir -p "$DIR/state" "$DIR/spool"
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat > "$CONF" <<EOF
ClusterName=dynascope-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=15
InactiveLimit=0
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  install
  if running slurmctld && running slurmd && SLURM_CONF=$CONF scontrol ping >/dev/null 2>&1; then
    return  # already up
  fi
  configure
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
    runuser -u munge -- munged
    touch "$DIR/munged.started"
  fi
  running slurmctld || slurmctld -f "$CONF"
  running slurmd || slurmd -f "$CONF"
  for _ in $(seq 60); do
    state=$(SLURM_CONF=$CONF sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
    case "$state" in
      idle*|mix*|alloc*) echo "slurm: node $HOST $state ($CONF)"; return ;;
      down*|drain*) SLURM_CONF=$CONF scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  echo "cluster.sh: the node did not come up; see $DIR/slurmctld.log and $DIR/slurmd.log" >&2
  exit 1
}

stop() {
  for daemon in slurmd slurmctld; do
    if running "$daemon"; then
      kill "$(cat "$DIR/$daemon.pid")"
    fi
  done
  if [ -f "$DIR/munged.started" ]; then
    pkill -x munged || true
    rm -f "$DIR/munged.started"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start | stop | env" >&2; exit 2 ;;
esac
