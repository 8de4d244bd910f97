"""One process of a 2-process CPU job for tests/test_distributed.py (launched with subprocess).

Usage: python tests/_multiprocess_worker.py PROCESS_ID PORT SCENARIO
  layout: build global batches from process-local rows and print what each process sees (JSON).
  exit:   process 1 exits right after a barrier; process 0 waits in the next barrier, which must end
          in an error instead of hanging.
  freeze: process 1 stops itself (SIGSTOP) after the barrier: its sockets stay open, only its
          heartbeats stop; process 0 must still end in an error.
"""

import json
import os
import signal
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cinjax import distributed  # noqa: E402  (imports jax but starts no backend)

LOCAL_ROWS = 4  # rows per process; 2 per device


def layout(process_id: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    mesh = distributed.make_mesh()
    local = {
        "image": np.arange(LOCAL_ROWS * 3, dtype=np.float32).reshape(LOCAL_ROWS, 3) + 100 * process_id,
        "modality": np.full((LOCAL_ROWS,), process_id, np.int32),
    }
    batch = distributed.host_to_global(local, mesh)
    shards = [
        {
            "device": s.device.id,
            "rows": [s.index[0].start, s.index[0].stop],
            "data": np.asarray(s.data).tolist(),
        }
        for s in batch["image"].addressable_shards
    ]
    total = jax.jit(lambda b: jnp.sum(b["image"]) + jnp.sum(b["modality"]))(batch)
    distributed.sync("layout-done")
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "mesh_devices": [d.id for d in mesh.devices.flat],
        "global_shape": list(batch["image"].shape),
        "local_batch_size": distributed.local_batch_size(2 * LOCAL_ROWS, mesh),
        "is_main": distributed.is_main_process(),
        "shards": shards,
        "total": float(distributed.global_to_host(total)),
        "gathered": distributed.global_to_host(batch["image"]).tolist(),
        "gathered_modality": distributed.global_to_host(batch["modality"]).tolist(),
    }


def die(process_id: int, how: str) -> None:
    distributed.sync("both-up")
    if process_id == 1:
        if how == "freeze":  # alive but silent: no heartbeats, sockets stay open
            os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(3)
    print(f"WAITING_SINCE {time.time()}", flush=True)
    distributed.sync("never-reached")
    print("SURVIVED_BARRIER", flush=True)
    time.sleep(120)


def main() -> None:
    process_id, port, scenario = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=3 if scenario in ("exit", "freeze") else 60,
        shutdown_timeout_seconds=5,
    )
    distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    if scenario == "layout":
        print("RESULT " + json.dumps(layout(process_id)), flush=True)
    elif scenario in ("exit", "freeze"):
        die(process_id, scenario)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main()
