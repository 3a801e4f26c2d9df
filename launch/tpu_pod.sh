#!/usr/bin/env bash
# Run the same training command on every worker of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   e.g. launch/tpu_pod.sh astro-v5p-128 us-east5-a configs/llama2_cpt.py:70b /mnt/shared/runs/cpt70b \
#          --config.mesh='(1,64,1)' --config.model.attention_impl=xla
#
# Every worker runs `python -m astrollama_jax train ... --distributed=on`; jax.distributed finds
# its peers from the TPU metadata. WORKDIR must be a folder all workers share (Filestore/NFS or
# a gcsfuse mount): checkpoints are written by all workers, metrics by worker 0.
# Environment: REPO_DIR (checkout on the workers, default ~/astrollama-jax), PYTHON (default
# python3), LOG (default tpu_pod.<time>.log). On TPU use attention_impl=xla (cudnn is a GPU kernel).
#
# Exit status: the highest of the workers' (as with srun); each worker reports its own in LOG.
# A maintenance event or preemption sends SIGTERM: the workers checkpoint and stop. What each
# status means and whether to rerun the same command (it resumes from WORKDIR):
# `python -m astrollama_jax.train.exit_codes` (astrollama_jax/train/exit_codes.py).
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,20p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO_DIR=${REPO_DIR:-'~/astrollama-jax'}
PYTHON=${PYTHON:-python3}
LOG=${LOG:-tpu_pod.$(date -u +%Y%m%dT%H%M%S).log}
EXTRA=$(printf ' %q' "$@")
status=0
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command \
  "cd $REPO_DIR && { $PYTHON -m astrollama_jax train --config=$CONFIG --workdir=$WORKDIR --distributed=on$EXTRA; \
   rc=\$?; echo \"astrollama-exit \$(hostname) status=\$rc\"; exit \$rc; }" 2>&1 | tee "$LOG" \
  || status=$?
# The highest worker status; gcloud's own when no worker reported one (ssh failed).
worst=$(sed -n 's/.*astrollama-exit .* status=\([0-9]*\).*/\1/p' "$LOG" | sort -n | tail -1)
exit "${worst:-$status}"
