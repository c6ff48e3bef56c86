#!/usr/bin/env bash
# One kvgate worker of a Slurm job, run by kvgate.sbatch's worker step (one task per worker),
# started again whenever it exits, until the step is stopped. Its memory limit comes from the
# allocation: the node's memory (--mem, or --mem-per-cpu times its CPUs) shared by the workers
# on the node, less the coordinator's share on the first node; GPU workers size their KV by
# the GPU's free memory instead. Arguments go to `kvgate worker` (the TLS flags).
set -uo pipefail
: "${KVGATE:?} ${KVGATE_COORDINATOR:?} ${KVGATE_RUN_DIR:?}"
PER_NODE=${KVGATE_WORKERS_PER_NODE:-1}
NODE=$(hostname)
ARGS=(--coordinator "$KVGATE_COORDINATOR" --cluster-token-file "$KVGATE_RUN_DIR/cluster-token"
      --host 0.0.0.0 --device "${KVGATE_DEVICE:-cpu}")
# Memory: MiB on this node for its workers.
mem=${SLURM_MEM_PER_NODE:-}
if [[ -z $mem && -n ${SLURM_MEM_PER_CPU:-} ]]; then mem=$(( SLURM_MEM_PER_CPU * ${SLURM_CPUS_ON_NODE:-1} )); fi
if [[ ${KVGATE_DEVICE:-cpu} == cpu* || ${KVGATE_DEVICE:-cpu} == guarded ]]; then
  if [[ -n $mem && $mem -gt 0 ]]; then
    [[ $NODE == "${KVGATE_FIRST_NODE:-}" || ${SLURM_NODEID:-} == 0 ]] && mem=$(( mem - ${KVGATE_COORDINATOR_MEM:-1024} ))
    (( mem > 0 )) || { echo "kvgate-worker.sh: the allocation leaves no memory for workers on $NODE" >&2; exit 1; }
    ARGS+=(--memory-limit "$(( mem / PER_NODE ))M")
  else
    # No memory in the allocation (a cluster without memory accounting): share what is free.
    ARGS+=(--memory-fraction "$(awk -v n="$PER_NODE" 'BEGIN { printf "%.3f", 0.8 / n }')")
  fi
  cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
  ARGS+=(--threads "$(( cpus / PER_NODE > 0 ? cpus / PER_NODE : 1 ))")
fi
stopping=0
pid=
trap 'stopping=1; [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null' TERM INT
while true; do
  "$KVGATE" worker "${ARGS[@]}" "$@" &
  pid=$!
  wait "$pid"
  rc=$?
  # A signal interrupts the first wait; the second collects the worker's exit.
  (( stopping )) && { wait "$pid" 2>/dev/null; exit 0; }
  echo "kvgate-worker.sh: the worker on $NODE (task ${SLURM_PROCID:-?}) exited ($rc);" \
    "starting it again in 2 s" >&2
  sleep 2
  (( stopping )) && exit 0
done
