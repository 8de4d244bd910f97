"""One process of a 2-process CPU job for tests/test_distributed.py (launched with subprocess).

Usage: python tests/_multiprocess_worker.py PROCESS_ID PORT SCENARIO
  layout: build the ("data",) mesh of both processes and print what each process sees (JSON).
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


def mesh_layout() -> dict:
    import jax

    mesh = distributed.make_mesh()
    distributed.sync("layout-done")
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "mesh_devices": [d.id for d in mesh.devices.flat],
        "mesh_processes": [d.process_index for d in mesh.devices.flat],
        "local_mesh_devices": [d.id for d in distributed.local_mesh().devices.flat],
        "is_main": distributed.is_main_process(),
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
        print("RESULT " + json.dumps(mesh_layout()), flush=True)
    elif scenario in ("exit", "freeze"):
        die(process_id, scenario)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main()
