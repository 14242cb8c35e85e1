#!/usr/bin/env bash
# Start a real Slurm cluster on this machine (munge + slurmctld + slurmd from Debian's packages).
# As root it needs no systemd. Idempotent: a running cluster of the same shape is left as it is.
#   infra/local-slurm.sh              one node: this machine, under its own host name
#   infra/local-slurm.sh --nodes N    N nodes, xlp-node1..N: one slurmd each, each in a network
#                                     namespace of its own with its own address and host name
#                                     (infra/local-nodes.sh); CPUS_PER_NODE each (default: nproc)
#   infra/local-slurm.sh stop         stop the daemons (the nodes' namespaces stay)
#   infra/local-slurm.sh install      only install the packages (`make test` does, before the tests)
# Installs slurm-wlm and munge with apt-get if they are missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/local-nodes.sh"

CONF_DIR=/etc/slurm
STATE=/var/spool/slurm-local
HOST=$(hostname -s)
NODES=1
ACTION=start
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=$2; shift 2 ;;
    --nodes=*) NODES=${1#--nodes=}; shift ;;
    stop|start|install) ACTION=$1; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "local-slurm.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$NODES" in ''|*[!0-9]*|0) echo "local-slurm.sh: --nodes must be a positive number, not '$NODES'" >&2; exit 2 ;; esac

stop() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  for _ in $(seq 50); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || return 0; sleep 0.2; done
  pkill -9 -x slurmd 2>/dev/null || true; pkill -9 -x slurmctld 2>/dev/null || true
}
if [ "$ACTION" = stop ]; then stop; echo "local-slurm.sh: stopped"; exit 0; fi

if [ "$(id -u)" != 0 ]; then echo "local-slurm.sh: run as root (it starts munged, slurmctld and slurmd)" >&2; exit 1; fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "local-slurm.sh: installing slurm-wlm and munge (apt-get)"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi
if [ "$ACTION" = install ]; then echo "local-slurm.sh: slurm-wlm and munge are installed"; exit 0; fi

# one start at a time on this machine: a second caller waits, then finds the cluster up (below).
# The daemons started below get the lock's descriptor closed (9>&-): one that inherited it would hold
# the lock for as long as it runs, and every later caller would wait forever.
LOCK=/run/lock/xlp-local-slurm.lock; [ -d /run/lock ] || LOCK=/tmp/xlp-local-slurm.lock
exec 9>"$LOCK"
if ! flock -w 300 9; then
  echo "local-slurm.sh: another start has held $LOCK for 5 minutes (fuser -v $LOCK names it)" >&2
  exit 1
fi

SHAPE="# xlp-local-slurm v2 nodes=$NODES"  # v2: the version of this file's slurm.conf
idle_nodes() { sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 ~ /^(idle|mix|alloc)/' | sort -u | wc -l; }
if grep -qxF "$SHAPE" "$CONF_DIR/slurm.conf" 2>/dev/null && pgrep -x slurmctld >/dev/null \
   && [ "$(pgrep -x slurmd | wc -l)" -ge "$NODES" ] && [ "$(idle_nodes)" -ge "$NODES" ]; then
  echo "local-slurm.sh: Slurm already up ($NODES node(s))"; sinfo; exit 0
fi

# munge: a key and the daemon (its socket is a file: the nodes' namespaces reach it too)
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged 9>&- 2>/dev/null || munged --force 9>&-

CPUS=${CPUS_PER_NODE:-$(nproc)}
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
if [ "$NODES" = 1 ]; then
  names=("$HOST"); ctld="$HOST"
  node_lines="NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
  partition_nodes=$HOST
else
  names=(); node_lines=""
  for k in $(seq "$NODES"); do
    names+=("xlp-node$k")
    local_node_up "xlp-node$k" "10.77.0.$((10 + k))"
    node_lines+="NodeName=xlp-node$k NodeAddr=10.77.0.$((10 + k)) NodeHostname=xlp-node$k CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"$'\n'
  done
  ctld="$HOST($LOCAL_BRIDGE_IP)"  # the nodes reach the controller on the bridge
  partition_nodes="xlp-node[1-$NODES]"
fi

stop  # a cluster of another shape (or a half-started one): start over
mkdir -p "$CONF_DIR" "$STATE/ctld" /var/log/slurm
cat > "$CONF_DIR/slurm.conf" <<CONF
$SHAPE
ClusterName=local
SlurmctldHost=$ctld
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d-%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
InactiveLimit=0
MinJobAge=300
SlurmdTimeout=60
# a requeued job waits cred_expire + 1 seconds before it starts again (default 120)
AuthInfo=cred_expire=30
$node_lines
PartitionName=debug Nodes=$partition_nodes Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
rm -f "$CONF_DIR/cgroup.conf"  # none: slurmd autodetects; "disabled" is unknown to Slurm 22.05

slurmctld -c 9>&-  # -c: no state from a cluster of another shape (its jobs are gone with it)
if [ "$NODES" = 1 ]; then
  mkdir -p "$STATE/d-$HOST"; slurmd 9>&-
else
  for name in "${names[@]}"; do mkdir -p "$STATE/d-$name"; local_node_run "$name" slurmd -N "$name" 9>&-; done
fi
for _ in $(seq 60); do
  if [ "$(idle_nodes)" -ge "$NODES" ]; then
    echo "local-slurm.sh: Slurm up ($NODES node(s))"; sinfo; exit 0
  fi
  for name in "${names[@]}"; do scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true; done
  sleep 1
done
echo "local-slurm.sh: Slurm did not come up; logs in /var/log/slurm/" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd*.log >&2 || true
exit 1
