"""Multi-process set-up and the ("data",) device mesh.

Data parallelism in cinjax is one mesh axis, ``"data"``, over every device of every process. Each
process loads the rows of the global batch its devices hold and turns them into one global
``jax.Array`` sharded along the batch axis (:class:`cinjax.data.pipeline.TrainLoader`); jitted steps
let XLA insert the all-reduces.

Multi-process runs call :func:`initialize` first, **before any other JAX call** (even
``jax.devices()`` initialises the backend, after which joining a distributed job is impossible).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

_log = logging.getLogger(__name__)


def detect_cluster() -> str | None:
    """Name the multi-process launcher found in the environment, or None for a single process.

    ``"slurm"`` (a SLURM job step with more than one task), ``"ompi"`` (``mpirun`` of Open MPI with
    more than one rank) or ``"tpu"`` (a Cloud TPU VM; JAX asks the TPU metadata for the pod layout).
    Only environments with more than one process count: a single SLURM task is a single process.
    """
    env = os.environ
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
        if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
            return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "ompi"
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_ACCELERATOR_TYPE"):
        return "tpu"
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    *,
    initialization_timeout: int = 300,
    heartbeat_timeout_seconds: int = 100,
    shutdown_timeout_seconds: int = 300,
) -> None:
    """Join the distributed JAX job, if there is one; idempotent. Call before any other JAX call.

    * Explicit: ``coordinator_address="host:port"`` (or ``$JAX_COORDINATOR_ADDRESS``) with
      ``num_processes`` and ``process_id``: every process passes the same address and count.
    * Automatic: with no arguments, SLURM (more than one task), Open MPI (more than one rank) and
      Cloud TPU VMs are detected and JAX reads the layout from the launcher.
    * Otherwise (a plain single process) nothing happens.

    Calling it again after a successful initialisation is a no-op (it checks that the arguments
    agree with the running job). ``heartbeat_timeout_seconds`` bounds how long the survivors of a
    crashed process keep waiting: once a process has missed heartbeats for that long, the JAX
    coordination service terminates every other process with an error naming the dead task,
    instead of leaving them hanging in a collective. ``initialization_timeout`` bounds how long a
    process waits for the others to join.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if jax.distributed.is_initialized():
        if num_processes is not None and num_processes != jax.process_count():
            raise RuntimeError(
                f"initialize(num_processes={num_processes}) but this process already joined a job of "
                f"{jax.process_count()} processes; call initialize once per process."
            )
        if process_id is not None and process_id != jax.process_index():
            raise RuntimeError(
                f"initialize(process_id={process_id}) but this process already joined as process "
                f"{jax.process_index()}; call initialize once per process."
            )
        return

    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    cluster = None if explicit else detect_cluster()
    if not explicit and cluster is None:
        _log.info("No multi-process launcher detected: running as a single process.")
        return
    if explicit and num_processes == 1:
        return
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        raise ValueError(
            "An explicit multi-process start needs coordinator_address ('host:port' of process 0), "
            f"num_processes and process_id together; got coordinator_address={coordinator_address!r}, "
            f"num_processes={num_processes}, process_id={process_id}."
        )
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=initialization_timeout,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds,
            shutdown_timeout_seconds=shutdown_timeout_seconds,
        )
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise RuntimeError(
                "cinjax.distributed.initialize() came after a JAX call that started the backend "
                "(jax.devices(), an array creation, a jit call, ...). Call it first thing in the "
                "program, before anything else touches JAX."
            ) from e
        raise
    except ValueError:
        if cluster != "tpu":
            raise
        _log.warning("On a TPU VM but JAX found no multi-host pod layout: running as a single process.")
        return
    _log.info(
        "Joined distributed job (%s): process %d of %d, %d local / %d global devices.",
        cluster or "explicit",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, metrics files and checkpoints metadata."""
    return jax.process_index() == 0


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ``("data",)`` mesh over all devices of all processes (or the first ``num_devices``).

    Axis type Auto: shardings propagate through ``jax.jit`` as in classic GSPMD data parallelism.
    """
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} but {len(devices)} devices exist.")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError(
                "A multi-process mesh must span every device (each process feeds its own devices); "
                f"got num_devices={num_devices} of {len(devices)}."
            )
        devices = devices[:num_devices]
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, scalars)."""
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split across the ``"data"`` axis; other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def local_mesh() -> Mesh:
    """A 1-D ``("data",)`` mesh over this process's devices (per-process work such as inference)."""
    return Mesh(np.array(jax.local_devices()), (DATA_AXIS,))


def sync(name: str) -> None:
    """Barrier across all processes (no-op for a single process); ``name`` must match everywhere."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
