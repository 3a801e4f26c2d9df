#!/usr/bin/env bash
# Plain multi-host GPU training without a scheduler: one process per host, 8 GPUs each.
#
#   HOSTS=gpu0,gpu1,gpu2,gpu3 launch/gpu_multihost.sh CONFIG WORKDIR [--config.key=value ...]
#       starts process i on the i-th host over ssh (host 0 is the coordinator);
#   launch/gpu_multihost.sh --local COORD_HOST:PORT NUM_PROCESSES PROCESS_ID CONFIG WORKDIR [...]
#       runs one process here (start it on every host yourself).
#
# WORKDIR must be on a filesystem every host shares. Environment: REPO_DIR (checkout path on the
# hosts, default: this checkout), PYTHON (default python3), PORT (default 12355).
#
# Exit status: the highest of the processes' (as with srun); INT/TERM here is forwarded to the
# trainers as SIGTERM, so they checkpoint and stop. What each status means and whether to rerun
# the same command (it resumes from WORKDIR): `python -m astrollama_jax.train.exit_codes`
# (astrollama_jax/train/exit_codes.py). Each process gets all of its host's GPUs.
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [[ ${1:-} == --local ]]; then
  [[ $# -ge 6 ]] || { sed -n '2,16p' "$0"; exit 2; }
  COORD=$2; N=$3; ID=$4; CONFIG=$5; WORKDIR=$6; shift 6
  echo $$ > "${TMPDIR:-/tmp}/astrollama-train-${COORD##*:}-$ID.pid"  # exec keeps the pid: for TERM
  exec "$PYTHON" -m astrollama_jax train --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator_address="$COORD" --num_processes="$N" --process_id="$ID" "$@"
fi
[[ $# -ge 2 && -n ${HOSTS:-} ]] || { sed -n '2,16p' "$0"; exit 2; }
CONFIG=$1; WORKDIR=$2; shift 2
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
IFS=, read -r -a HOST_LIST <<< "$HOSTS"
N=${#HOST_LIST[@]}
COORD="${HOST_LIST[0]}:${PORT:-12355}"
EXTRA=$(printf ' %q' "$@")
pids=()
for i in "${!HOST_LIST[@]}"; do
  ssh "${HOST_LIST[$i]}" "cd $REPO_DIR && PYTHON=$PYTHON launch/gpu_multihost.sh --local $COORD $N $i $CONFIG $WORKDIR$EXTRA" \
    > "gpu_multihost.$i.log" 2>&1 &
  pids+=($!)
done
forward_term() {  # SIGTERM to the trainers themselves (killing ssh would not reach them)
  for i in "${!HOST_LIST[@]}"; do
    ssh "${HOST_LIST[$i]}" "kill -TERM \$(cat \${TMPDIR:-/tmp}/astrollama-train-${COORD##*:}-$i.pid)" &
  done
}
trap forward_term INT TERM   # the trainers checkpoint at the next step and exit 75
status=0
for i in "${!pids[@]}"; do
  while :; do
    rc=0; wait "${pids[$i]}" || rc=$?
    kill -0 "${pids[$i]}" 2>/dev/null || break  # else a trap interrupted wait: wait again
  done
  echo "process $i on ${HOST_LIST[$i]}: exit status $rc (gpu_multihost.$i.log)" >&2
  if (( rc > status )); then status=$rc; fi
done
exit $status
