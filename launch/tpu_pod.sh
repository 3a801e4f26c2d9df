#!/usr/bin/env bash
# Run the same training command on every worker of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   e.g. launch/tpu_pod.sh astro-v5p-128 us-east5-a configs/llama2_cpt.py:70b /mnt/shared/runs/cpt70b \
#          --config.mesh='(1,64,1)' --config.model.attention_impl=xla
#
# Every worker runs `python -m astrollama_jax.train ... --distributed=on`; jax.distributed finds
# its peers from the TPU metadata. WORKDIR must be a folder all workers share (Filestore/NFS or
# a gcsfuse mount): checkpoints are written by all workers, metrics by worker 0.
# Environment: REPO_DIR (checkout on the workers, default ~/astrollama-jax), PYTHON (default
# python3). On TPU use attention_impl=xla (cudnn is a GPU kernel).
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,14p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO_DIR=${REPO_DIR:-'~/astrollama-jax'}
PYTHON=${PYTHON:-python3}
EXTRA=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command \
  "cd $REPO_DIR && $PYTHON -m astrollama_jax.train --config=$CONFIG --workdir=$WORKDIR --distributed=on$EXTRA"
