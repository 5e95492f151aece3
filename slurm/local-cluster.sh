#!/usr/bin/env bash
# A ONE-node Slurm cluster on localhost, for trying slurm/*.sbatch and for CI (Debian/Ubuntu, as root, no systemd).
#
#   slurm/local-cluster.sh start            install (apt) slurmctld, slurmd, slurm-client and munge if missing,
#                                           write /etc/slurm/slurm.conf, start the daemons, wait for the node to be idle
#   slurm/local-cluster.sh stop [--purge]   cancel jobs, stop what `start` started (by pid file); --purge also deletes
#                                           the state/log folder and /etc/slurm/slurm.conf
#   slurm/local-cluster.sh status           daemons, node state and queue; exit 0 only if the node takes jobs
#
# All three are idempotent: `start` on a running cluster only checks that the node is idle (and restarts the daemons
# if the settings below changed the config). Daemons are started directly, not through systemd or init scripts; the
# packages' post-install is kept from starting services with a temporary /usr/sbin/policy-rc.d. No cgroup plugins
# (proctrack/linuxproc, task/none): they fail in containers and most VMs. The node is named `localhost` whatever the
# hostname is. Jobs run as the user who submits them.
#
# Settings (environment variables; the reference script's SLURM_LOCAL_* names are read too):
#   ECGFM_SLURM_BASE       state, logs and pid files           (default /tmp/ecgfm-slurm)
#   ECGFM_SLURM_AUTH       munge | none                        (default munge)
#   ECGFM_SLURM_CPUS       CPUs the node advertises            (default: the real count, at least 8, so
#                          train.sbatch's --cpus-per-task=8 fits; SlurmdParameters=config_overrides lets it exceed
#                          the real count)
#   ECGFM_SLURM_PARTITION  partition name                      (default debug)
#   ECGFM_SLURM_TIMEOUT    seconds to wait for daemons and node (default 60)
set -euo pipefail

BASE=${ECGFM_SLURM_BASE:-${SLURM_LOCAL_BASE:-/tmp/ecgfm-slurm}}
AUTH=${ECGFM_SLURM_AUTH:-${SLURM_LOCAL_AUTH:-munge}}
_real_cpus=$(nproc)
CPUS=${ECGFM_SLURM_CPUS:-${SLURM_LOCAL_CPUS:-$((_real_cpus > 8 ? _real_cpus : 8))}}
PARTITION=${ECGFM_SLURM_PARTITION:-${SLURM_LOCAL_PARTITION:-debug}}
TIMEOUT=${ECGFM_SLURM_TIMEOUT:-${SLURM_LOCAL_TIMEOUT:-60}}
CONF=/etc/slurm/slurm.conf
NODE=localhost
PACKAGES=(slurmctld slurmd slurm-client munge)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

log() { echo "[local-cluster] $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

# alive PIDFILE COMM: the pid in PIDFILE is a live process named COMM. PID 1 in a container is often not an init that
# reaps, so a killed daemon can linger as a zombie: zombies count as stopped.
alive() {
  local pf=$1 comm=$2 pid st
  [[ -s $pf ]] || return 1
  pid=$(<"$pf")
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/stat ]] || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
  st=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
  [[ -n $st && $st != Z ]]
}

# stop_pidfile PIDFILE COMM: SIGTERM, up to 15 s, then SIGKILL; removes the pid file.
stop_pidfile() {
  local pf=$1 comm=$2 pid i
  if ! alive "$pf" "$comm"; then
    rm -f "$pf"
    return 0
  fi
  pid=$(<"$pf")
  log "stopping $comm (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 75; i++)); do
    alive "$pf" "$comm" || {
      rm -f "$pf"
      return 0
    }
    sleep 0.2
  done
  log "$comm (pid $pid) ignored SIGTERM, sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pf"
}

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1; }

install_packages() {
  local b need=0
  for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/bin/srun /usr/bin/sinfo /usr/sbin/munged; do
    [[ -x $b ]] || need=1
  done
  ((need)) || return 0
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get: install ${PACKAGES[*]}"
  log "installing ${PACKAGES[*]} (apt)"
  local made_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  local rc=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${PACKAGES[@]}" >/dev/null; } || rc=$?
  ((made_policy)) && rm -f /usr/sbin/policy-rc.d
  ((rc == 0)) || die "apt-get install ${PACKAGES[*]} failed (exit $rc)"
}

write_config() {
  mkdir -p "$BASE"/{state/ctld,state/d,log,run} /etc/slurm
  local realmem authtype credtype new
  realmem=$(($(awk '/^MemTotal:/{print $2}' /proc/meminfo) * 9 / 10 / 1024))
  if [[ $AUTH == munge ]]; then
    authtype=auth/munge credtype=cred/munge
  else
    authtype=auth/none credtype=cred/none
  fi
  new=$(mktemp)
  cat >"$new" <<EOF
# Written by ecgfm's slurm/local-cluster.sh: a one-node cluster on localhost, no cgroups.
ClusterName=ecgfm-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=$authtype
CredType=$credtype
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$CPUS RealMemory=$realmem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  if ! cmp -s "$new" "$CONF"; then
    log "writing $CONF (CPUs=$CPUS, partition $PARTITION, auth $AUTH, state in $BASE)"
    stop_pidfile "$BASE/run/slurmd.pid" slurmd # running with another config: restart
    stop_pidfile "$BASE/run/slurmctld.pid" slurmctld
    install -m 0644 "$new" "$CONF"
  fi
  rm -f "$new"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  [[ $AUTH == munge ]] || return 0
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 0700 /etc/munge
    if [[ -x /usr/sbin/mungekey ]]; then
      runuser -u munge -- /usr/sbin/mungekey --create --force
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  if munge_works; then
    log "munged already running"
    return 0
  fi
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
  cp /run/munge/munged.pid "$BASE/run/munged.pid" # marks munged as ours: `stop` stops only a munged we started
  local i
  for ((i = 0; i < 50; i++)); do
    munge_works && return 0
    sleep 0.1
  done
  die "munged started but munge -n | unmunge fails"
}

wait_for() { # wait_for SECONDS COMMAND...: poll every 0.2 s
  local i
  for ((i = 0; i < $1 * 5; i++)); do
    "${@:2}" && return 0
    sleep 0.2
  done
  return 1
}

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

node_usable() {
  local state
  state=$(node_state)
  case $state in
  idle* | mixed* | allocated* | completing*) return 0 ;;
  down* | drain* | fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  return 1
}

start() {
  [[ $EUID -eq 0 ]] || die "start must run as root (it installs packages and starts daemons)"
  [[ $AUTH == munge || $AUTH == none ]] || die "ECGFM_SLURM_AUTH must be munge or none, not '$AUTH'"
  [[ $CPUS =~ ^[1-9][0-9]*$ ]] || die "ECGFM_SLURM_CPUS must be a positive integer, not '$CPUS'"
  local t0 t1 t2
  t0=$(date +%s.%N)
  install_packages
  t1=$(date +%s.%N)
  write_config
  start_munge
  if alive "$BASE/run/slurmctld.pid" slurmctld; then
    log "slurmctld already running (pid $(<"$BASE/run/slurmctld.pid"))"
  else
    log "starting slurmctld"
    /usr/sbin/slurmctld # forks into the background and writes SlurmctldPidFile
  fi
  wait_for "$TIMEOUT" ctld_up || {
    tail -n 30 "$BASE/log/slurmctld.log" >&2 || true
    die "slurmctld did not answer within ${TIMEOUT}s (log: $BASE/log/slurmctld.log)"
  }
  if alive "$BASE/run/slurmd.pid" slurmd; then
    log "slurmd already running (pid $(<"$BASE/run/slurmd.pid"))"
  else
    log "starting slurmd"
    /usr/sbin/slurmd -N "$NODE"
  fi
  wait_for "$TIMEOUT" node_usable || {
    tail -n 30 "$BASE/log/slurmctld.log" "$BASE/log/slurmd.log" >&2 || true
    die "node $NODE is '$(node_state)' after ${TIMEOUT}s (logs: $BASE/log)"
  }
  t2=$(date +%s.%N)
  log "cluster up: node $NODE $(node_state), $CPUS CPUs, partition $PARTITION, auth $AUTH" \
    "(install $(awk "BEGIN{printf \"%.1f\", $t1-$t0}") s, start $(awk "BEGIN{printf \"%.1f\", $t2-$t1}") s)"
  log "logs in $BASE/log; stop with: $0 stop"
}

stop() {
  local purge=0 arg jobs pid st i
  for arg in "$@"; do
    case $arg in
    --purge) purge=1 ;;
    *) usage ;;
    esac
  done
  if alive "$BASE/run/slurmctld.pid" slurmctld; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
      log "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for ((i = 0; i < 75; i++)); do
        [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
        sleep 0.2
      done
    fi
  fi
  stop_pidfile "$BASE/run/slurmd.pid" slurmd
  stop_pidfile "$BASE/run/slurmctld.pid" slurmctld
  # step daemons that outlived scancel (children of the slurmd stopped above), each by its pid
  for pid in $(pgrep -x slurmstepd 2>/dev/null || true); do
    st=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
    if [[ -n $st && $st != Z ]]; then
      log "killing leftover slurmstepd $pid"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  if [[ -s $BASE/run/munged.pid ]]; then # only a munged that `start` started
    if [[ -s /run/munge/munged.pid && $(<"$BASE/run/munged.pid") == $(</run/munge/munged.pid) ]]; then
      stop_pidfile /run/munge/munged.pid munged
    fi
    rm -f "$BASE/run/munged.pid"
  fi
  if ((purge)); then
    log "purging $BASE and $CONF"
    rm -rf "$BASE" "$CONF"
  fi
  log "stopped"
}

status() {
  local ok=0 name
  for name in slurmctld slurmd; do
    if alive "$BASE/run/$name.pid" "$name"; then
      echo "$name: running (pid $(<"$BASE/run/$name.pid"))"
    else
      echo "$name: not running"
      ok=1
    fi
  done
  if [[ $AUTH == munge ]]; then
    if munge_works; then echo "munged: running"; else echo "munged: not running" && ok=1; fi
  fi
  if ((ok == 0)) && ctld_up; then
    echo "node $NODE: $(node_state)"
    sinfo -h -o 'partition %P: %a, %D node(s), %c CPUs per node' 2>/dev/null || true
    echo "queue:"
    squeue -o '  %.8i %.12j %.8u %.10T %.10M %R' 2>/dev/null || true
    node_usable || ok=1
  fi
  echo "config $CONF, logs $BASE/log"
  return $ok
}

case ${1:-} in
start)
  shift
  (($# == 0)) || usage
  start
  ;;
stop)
  shift
  stop "$@"
  ;;
status)
  shift
  (($# == 0)) || usage
  status
  ;;
*) usage ;;
esac
