#!/usr/bin/env bash
# A real SLURM cluster for tests on this machine: munged + slurmctld + one slurmd per node.
#
#   scripts/slurm_cluster.sh install        apt packages (root): slurmctld slurmd slurm-client munge
#   scripts/slurm_cluster.sh start DIR [N]  write DIR/slurm.conf, start the daemons for N nodes
#                                           (default 1), wait until they are idle
#   scripts/slurm_cluster.sh stop DIR       cancel every job, then stop the daemons
#
# Clients need SLURM_CONF=DIR/slurm.conf. Needs root. Everything lives in DIR (state, spool,
# logs, the munge socket), so nothing of the machine's own configuration is touched.
# Several nodes: node 1 is this host's name, node K (K > 1) is HOST-K, each a slurmd of its
# own (slurmd -N NAME, port 6817+K, NodeAddr 127.0.0.1), each with all of this machine's CPUs.
# Debian's slurmd runs them side by side. Only node 1's name resolves, so a job that may start
# on another one needs MASTER_ADDR=127.0.0.1 in its environment (Lightning's SLURM environment
# reads it instead of resolving the first node's name).
# Settings that matter (SLURM 22.05): no cgroups (proctrack/linuxproc, task/none);
# MinJobAge=2 so finished jobs leave squeue within seconds; sched_interval=2 and bf_interval=1
# with cred_expire=5 so a requeued job starts again in ~6 s instead of ~157 s; the munge
# socket directory must be mode 0755; MailProg=/bin/true (no mailer installed).
set -euo pipefail

cmd=${1:?usage: slurm_cluster.sh install|start DIR [N]|stop DIR}

if [[ $cmd == install ]]; then
  [[ $(id -u) == 0 ]] || { echo "slurm_cluster.sh install: needs root" >&2; exit 1; }
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null
  fi
  exit 0
fi

dir=$(realpath -m "${2:?usage: slurm_cluster.sh $cmd DIR}")
export SLURM_CONF=$dir/slurm.conf

if [[ $cmd == stop ]]; then
  # slurmstepd outlives slurmd: cancel the jobs first, or their processes linger.
  scancel --full --quiet --user=root 2>/dev/null || true
  for _ in $(seq 50); do
    [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
    sleep 0.2
  done
  for pidfile in "$dir"/slurmd-*.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
    if [[ -f $pidfile ]]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
  exit 0
fi

[[ $cmd == start ]] || { echo "unknown command $cmd" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "slurm_cluster.sh start: needs root" >&2; exit 1; }
host=$(hostname -s)
cpus=$(nproc)
names=("$host")
for (( k = 2; k <= ${3:-1}; k++ )); do names+=("$host-$k"); done
nodelist=$(IFS=,; echo "${names[*]}")
mkdir -p "$dir"/{state,spool,munge}
chmod 0755 "$dir/munge"  # munged refuses a socket directory others cannot read
cat >"$dir/slurm.conf" <<EOF
ClusterName=rdpo-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
MinJobAge=2
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
SlurmctldPort=6817
$(for k in "${!names[@]}"; do
  echo "NodeName=${names[k]} NodeHostname=$host NodeAddr=127.0.0.1 Port=$(( 6818 + k )) CPUs=$cpus State=UNKNOWN"
done)
PartitionName=debug Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP
EOF
munged --force --socket="$dir/munge/munge.socket" --pid-file="$dir/munged.pid" \
  --log-file="$dir/munged.log" --seed-file="$dir/munge/munge.seed"
slurmctld -f "$SLURM_CONF"
for name in "${names[@]}"; do slurmd -f "$SLURM_CONF" -N "$name"; done
for _ in $(seq 100); do
  state=$(sinfo -h -n "$nodelist" -o %T 2>/dev/null | sort -u | paste -sd, || true)
  [[ $state == idle ]] && exit 0
  sleep 0.2
done
echo "slurm_cluster.sh: $nodelist not idle after 20 s (states: ${state:-none}); see $dir/*.log" >&2
exit 1
