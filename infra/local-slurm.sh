#!/usr/bin/env bash
# Start a real single-node Slurm on this machine (munge + slurmctld + slurmd from Debian's packages).
# As root it needs no systemd. Idempotent: a running cluster is left as it is.
#   infra/local-slurm.sh          start (installing slurm-wlm and munge with apt-get if missing)
#   infra/local-slurm.sh stop     stop the daemons
set -euo pipefail

CONF_DIR=/etc/slurm
STATE=/var/spool/slurm-local
NODE=$(hostname -s)

stop() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
}
if [ "${1:-start}" = "stop" ]; then stop; exit 0; fi

if [ "$(id -u)" != 0 ]; then echo "local-slurm.sh: run as root (it starts munged, slurmctld and slurmd)" >&2; exit 1; fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "local-slurm.sh: installing slurm-wlm and munge (apt-get)"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi

if pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null \
   && sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
  echo "local-slurm.sh: Slurm already up"; sinfo; exit 0
fi

# munge: a key and the daemon
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged 2>/dev/null || munged --force

CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" /var/log/slurm
cat > "$CONF_DIR/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
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
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
# cgroup.conf: leave it to autodetection
rm -f "$CONF_DIR/cgroup.conf"  # none: slurmd autodetects; "disabled" is unknown to Slurm 22.05

pgrep -x slurmctld >/dev/null || slurmctld -i
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    echo "local-slurm.sh: Slurm up"; sinfo; exit 0
  fi
  scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "local-slurm.sh: Slurm did not come up; logs in /var/log/slurm/" >&2
tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
