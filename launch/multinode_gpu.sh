#!/usr/bin/env bash
# Run on every host: HOST0 (address of process 0), NUM_HOSTS and HOST_ID set per host.
# Usage: HOST0=10.0.0.1 NUM_HOSTS=2 HOST_ID=0 launch/multinode_gpu.sh configs/mmwhs.py:c_unet runs/c-unet [...]
set -euo pipefail
config=${1:?config file}; workdir=${2:?workdir (shared filesystem)}; shift 2
python -m cinjax.main --config "$config" --workdir "$workdir" \
  --coordinator_address="${HOST0:?}:${PORT:-12355}" --num_processes="${NUM_HOSTS:?}" --process_id="${HOST_ID:?}" "$@"
