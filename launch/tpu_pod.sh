#!/usr/bin/env bash
# Run the same command on every worker of a TPU pod slice (auto-detected by jax.distributed).
# Usage: launch/tpu_pod.sh TPU_NAME ZONE configs/mmwhs.py:c_unet gs://bucket/runs/c-unet [...]
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?config}; workdir=${4:?workdir}; shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd cinjax && python -m cinjax.main --config $config --workdir $workdir $*"
