"""Mesh, shardings and host-local -> global batches on 8 fake CPU devices, plus real 2-process jobs."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest
from jax.sharding import PartitionSpec as P

from cinjax import distributed

WORKER = os.path.join(os.path.dirname(__file__), "_multiprocess_worker.py")
LAUNCHER_VARS = (
    "SLURM_JOB_ID",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_NPROCS",
    "OMPI_MCA_orte_hnp_uri",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "TPU_ACCELERATOR_TYPE",
    "JAX_COORDINATOR_ADDRESS",
)


@pytest.fixture
def clean_env(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_mesh_spans_all_devices():
    mesh = distributed.make_mesh()
    assert mesh.axis_names == ("data",)
    assert list(mesh.devices.flat) == jax.devices()
    assert mesh.size == 8
    assert distributed.make_mesh(4).size == 4
    with pytest.raises(ValueError, match="devices exist"):
        distributed.make_mesh(9)
    assert distributed.replicated(mesh).spec == P()
    assert distributed.data_sharding(mesh).spec == P("data")


def test_single_process_initialize_is_a_noop(clean_env):
    assert distributed.detect_cluster() is None
    distributed.initialize()
    distributed.initialize(num_processes=1, process_id=0)
    assert not jax.distributed.is_initialized()
    assert distributed.is_main_process()
    distributed.sync("single-process")


def test_initialize_errors(clean_env):
    with pytest.raises(ValueError, match="num_processes and process_id together"):
        distributed.initialize(coordinator_address="127.0.0.1:1234")
    # The backend is already running in this test process: joining a job must fail clearly.
    with pytest.raises(RuntimeError, match="before anything else touches JAX"):
        distributed.initialize(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=0)


def test_detect_cluster(clean_env):
    clean_env.setenv("SLURM_JOB_ID", "7")
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    assert distributed.detect_cluster() is None
    clean_env.setenv("SLURM_NTASKS", "4")
    assert distributed.detect_cluster() == "slurm"
    for var in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS"):
        clean_env.delenv(var)
    clean_env.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.0.0.1:34911")
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert distributed.detect_cluster() == "ompi"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str) -> list[subprocess.Popen]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return [
        subprocess.Popen(
            [sys.executable, WORKER, str(i), str(port), scenario],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_two_processes_share_one_mesh():
    procs = _launch("layout")
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            _stop(p)
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        line = next(line for line in out.splitlines() if line.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT ") :]))
    for pid, r in enumerate(results):
        assert (r["process_index"], r["process_count"], r["device_count"]) == (pid, 2, 4)
        assert r["is_main"] == (pid == 0)
        assert r["mesh_devices"] == results[0]["mesh_devices"] and r["mesh_processes"] == [0, 0, 1, 1]
        assert r["local_mesh_devices"] == r["mesh_devices"][2 * pid : 2 * pid + 2]


@pytest.mark.parametrize("scenario", ["exit", "freeze"])
def test_survivor_fails_fast_when_a_process_dies(scenario):
    """Heartbeat timeout 3 s: the survivor must abort with an error, not hang in the barrier."""
    procs = _launch(scenario)
    try:
        out, err = procs[0].communicate(timeout=60)
        ended = time.time()
    finally:
        if scenario == "freeze" and procs[1].poll() is None:
            os.kill(procs[1].pid, signal.SIGKILL)
        for p in procs:
            _stop(p)
    assert procs[0].returncode not in (0, None), out
    assert "SURVIVED_BARRIER" not in out
    # Gloo may write to the same stdout without a newline in between: match the number only.
    waiting_since = float(re.search(r"WAITING_SINCE ([0-9.]+\d)", out).group(1))
    assert ended - waiting_since < 20  # heartbeat timeout 3 s (+ slack for a loaded machine)
    if scenario == "freeze":  # only the heartbeat monitor can notice a silent process
        assert "stopped sending heartbeats" in err, err[-3000:]
    else:  # the collective sees the closed socket, or the heartbeat monitor the missing process
        assert "Connection closed by peer" in err or "another task died" in err, err[-3000:]
