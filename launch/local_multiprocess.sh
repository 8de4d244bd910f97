#!/usr/bin/env bash
# N processes on this machine, each with DEVICES fake CPU devices (or its share of the GPUs).
# Usage: launch/local_multiprocess.sh N CONFIG WORKDIR [--config.x=y ...]
set -euo pipefail
n=${1:?number of processes}; config=${2:?config file}; workdir=${3:?workdir}; shift 3
port=${PORT:-$((20000 + RANDOM % 20000))}
devices=${DEVICES:-2}
pids=()
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}" \
    python -m cinjax.main --config "$config" --workdir "$workdir" \
    --coordinator_address="127.0.0.1:${port}" --num_processes="$n" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
