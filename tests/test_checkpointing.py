"""Checkpointing: state + data-iterator roundtrips, latest vs best, resharding, crash safety, signals."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cinjax.checkpointing import (
    Checkpointer,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    restore_inference_variables,
)
from cinjax.preemption import PreemptionFlag
from cinjax.workdir import Workdir, WorkdirError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_state(seed: int = 0) -> dict:
    """A train-state pytree like the trainer's: params, AdamW state, step, typed PRNG key."""
    rng = np.random.default_rng(seed)
    params = {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 2, 4)), jnp.float32)},
        "head": {
            "kernel": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
            "bias": jnp.zeros((3,), jnp.float32),
        },
    }
    tx = optax.adamw(1e-3, weight_decay=1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu / nu / count
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(7, jnp.int32),
        "rng": jax.random.key(seed),
    }


def _abstract(tree, sharding_fn=None):
    sharding_fn = sharding_fn or (lambda path, x: jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    shapes = jax.eval_shape(lambda: tree)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(path, x)), shapes
    )


def _assert_tree_equal(a, b):
    def unwrap(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(x))
        return np.asarray(x)

    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(unwrap(x), unwrap(y))


def _iterator(seed: int = 3):
    return iter(grain.MapDataset.range(40).shuffle(seed=seed).to_iter_dataset())


@pytest.fixture(scope="module")
def state():
    return _make_state()


def test_roundtrip_adamw_state_step_rng(tmp_path, state):
    with Checkpointer(tmp_path, config_hash="abc") as ckpt:
        assert ckpt.restore_latest(_abstract(state)) is None
        assert ckpt.save(7, state, meta={"plateau": {"best": 0.5, "bad": float("nan")}})
        ckpt.wait()
        step, restored, meta = ckpt.restore_latest(_abstract(state))
    assert step == 7
    _assert_tree_equal(restored, state)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    # The restored key continues the same random stream.
    np.testing.assert_array_equal(
        jax.random.normal(restored["rng"], (4,)), jax.random.normal(state["rng"], (4,))
    )
    assert meta["config_hash"] == "abc" and meta["step"] == 7
    assert meta["plateau"] == {"best": 0.5, "bad": None}


def test_async_save_survives_donating_the_state(tmp_path, state):
    """The trainer donates the state to the next step right after ``save`` returns."""
    overwrite = jax.jit(
        lambda s: jax.tree.map(lambda x: x * 0 + 7 if x.dtype == jnp.float32 else x, s), donate_argnums=0
    )
    live = jax.tree.map(jnp.copy, state)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, live)
        for _ in range(3):  # donated (or, while orbax still holds the buffers, copied by JAX)
            live = overwrite(live)
        jax.block_until_ready(live)
        ckpt.wait()
        _, restored, _ = ckpt.restore_latest(_abstract(state))
    assert float(live["params"]["head"]["bias"][0]) == 7.0
    _assert_tree_equal(restored, state)  # `live` was a copy of `state`; its buffers were donated


def test_latest_and_best_are_kept_separately(tmp_path, state):
    best_state = {"params": state["params"], "model_state": {}}
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            assert ckpt.save(step, state)
        assert ckpt.save_best(2, best_state, dice=0.8)
        assert not ckpt.save_best(3, best_state, dice=float("nan"))
        assert not ckpt.save_best(4, best_state, dice=0.5)  # worse: the best stays at step 2
        ckpt.wait()
        assert ckpt.latest_step() == 4 and ckpt.best_step() == 2
    assert sorted(os.listdir(tmp_path / "checkpoints" / "latest")) == ["3", "4"]
    assert os.listdir(tmp_path / "checkpoints" / "best") == ["2"]
    # A new process sees the same and remembers the best Dice, so a worse eval never replaces it.
    better = {"params": _make_state(seed=2)["params"], "model_state": {}}
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.best_dice == pytest.approx(0.8)
        assert not ckpt.save_best(5, best_state, dice=0.79)
        assert ckpt.save_best(6, better, dice=0.9)
        ckpt.wait()
        assert ckpt.best_step() == 6
    params = restore_inference_variables(tmp_path, prefer="best").params
    _assert_tree_equal(params, jax.tree.map(np.asarray, better["params"]))
    assert os.listdir(tmp_path / "checkpoints" / "best") == ["6"]
    assert sorted(os.listdir(tmp_path / "checkpoints" / "latest")) == ["3", "4"]


def test_save_skips_a_step_already_on_disk(tmp_path, state):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.save(5, state)
        assert not ckpt.save(5, state)  # already on disk: no error, no rewrite
        assert ckpt.save(6, state)
        assert ckpt.latest_step() == 6


def test_data_iterator_state_roundtrip_with_async_save(tmp_path, state):
    it = _iterator()
    seen = [next(it) for _ in range(5)]
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(5, state, data_iter=it)
        # The loop keeps consuming while the async write runs; the saved position is the one at save().
        expected = [next(it) for _ in range(8)]
        ckpt.wait()
        assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(tmp_path / "checkpoints" / "latest"))
    fresh = _iterator()
    with Checkpointer(tmp_path) as ckpt:
        step, _, _ = ckpt.restore_latest(_abstract(state), data_iter=fresh)
    assert step == 5
    assert [next(fresh) for _ in range(8)] == expected
    assert sorted(seen + expected) != list(range(13))  # the shuffle is real, so order matters


def test_data_iterator_missing_or_from_other_process_count(tmp_path, state, caplog):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)  # saved without an iterator
        ckpt.save(2, state, data_iter=_iterator())
    item_dir = tmp_path / "checkpoints" / "latest" / "2" / "data_iter"
    os.rename(item_dir / "process_0-of-1.json", item_dir / "process_0-of-2.json")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointMismatchError, match="saved by another process count"):
            ckpt.restore_latest(_abstract(state), data_iter=_iterator())
    shutil.rmtree(tmp_path / "checkpoints" / "latest" / "2")
    fresh = _iterator()
    with Checkpointer(tmp_path) as ckpt:
        step, _, _ = ckpt.restore_latest(_abstract(state), data_iter=fresh)
    assert step == 1 and "no data-iterator state" in caplog.text
    assert [next(fresh) for _ in range(5)] == list(itertools.islice(_iterator(), 5))  # untouched


def test_restore_onto_8_device_mesh(tmp_path, state):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    data_sharded = NamedSharding(mesh, P("data"))

    def sharding_fn(path, x):
        keys = [getattr(k, "key", None) for k in path]
        return data_sharded if keys[-2:] == ["head", "kernel"] else replicated

    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)
        step, restored, _ = ckpt.restore_latest(_abstract(state, sharding_fn))
    assert step == 1
    _assert_tree_equal(restored, state)
    head = restored["params"]["head"]["kernel"]
    assert head.sharding == data_sharded
    assert {s.data.shape for s in head.addressable_shards} == {(2, 3)}
    assert restored["params"]["conv"]["kernel"].sharding == replicated
    assert restored["opt_state"][0].mu["head"]["kernel"].sharding == data_sharded


def test_restore_inference_variables_sources(tmp_path, state):
    workdir = tmp_path / "run"
    with Checkpointer(workdir, async_save=False) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, jax.tree.map(lambda x: x, _make_state(seed=1)))
        ckpt.save_best(1, {"params": state["params"]}, dice=0.7)
    latest_params = _make_state(seed=1)["params"]
    for path, kwargs, expected in [
        (workdir, {}, state["params"]),  # workdir → best by default
        (workdir, {"prefer": "latest"}, latest_params),
        (workdir / "checkpoints" / "latest", {}, latest_params),  # manager dir → newest step
        (workdir / "checkpoints" / "latest" / "1", {}, state["params"]),  # one step dir
    ]:
        params = restore_inference_variables(path, **kwargs).params
        assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
        _assert_tree_equal(params, jax.tree.map(np.asarray, expected))
    # A converted-weights directory: params written by orbax under DIR/params.
    converted = tmp_path / "converted"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(converted / "params", state["params"])
    checkpointer.wait_until_finished()
    params, model_state = restore_inference_variables(converted)[:2]
    _assert_tree_equal(params, jax.tree.map(np.asarray, state["params"]))
    assert model_state == {}
    with pytest.raises(CheckpointNotFoundError, match="No checkpoint found"):
        restore_inference_variables(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        restore_inference_variables(tmp_path / "missing")


def test_restore_inference_variables_with_model_state(tmp_path, state):
    batch_stats = {"bn": {"mean": jnp.arange(4.0), "var": jnp.ones(4)}}
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, dict(state, model_state={"batch_stats": batch_stats}))
        ckpt.save_best(1, {"params": state["params"]}, dice=0.5)
    params, model_state = restore_inference_variables(tmp_path, prefer="latest")[:2]
    _assert_tree_equal(params, jax.tree.map(np.asarray, state["params"]))
    _assert_tree_equal(model_state, {"batch_stats": jax.tree.map(np.asarray, batch_stats)})
    params, model_state = restore_inference_variables(tmp_path)[:2]  # best holds params only
    _assert_tree_equal(params, jax.tree.map(np.asarray, state["params"]))
    assert model_state == {}


_CRASH_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from orbax.checkpoint._src.path import async_path
    from cinjax.checkpointing import Checkpointer

    workdir = sys.argv[1]
    ckpt = Checkpointer(workdir)
    ckpt.save(1, {"w": np.full((64, 64), 1.0, np.float32)})
    ckpt.wait()

    original_rename = async_path.rename

    async def rename_then_die(src, dst):
        # Step 2 is fully written to its tmp dir; die right before the commit rename.
        if os.path.basename(str(dst)) == "2":
            os.kill(os.getpid(), signal.SIGKILL)
        return await original_rename(src, dst)

    async_path.rename = rename_then_die
    ckpt.save(2, {"w": np.full((64, 64), 2.0, np.float32)})
    ckpt.wait()
    """
)


def test_sigkill_mid_save_keeps_newest_complete_checkpoint(tmp_path):
    env = dict(
        os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_CHILD, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    latest_dir = tmp_path / "checkpoints" / "latest"
    leftovers = [n for n in os.listdir(latest_dir) if n.startswith("2.orbax-checkpoint-tmp")]
    assert leftovers, os.listdir(latest_dir)  # the kill really happened mid-save

    abstract = {
        "w": jax.ShapeDtypeStruct(
            (64, 64), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
    }
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.latest_step() == 1
        step, restored, _ = ckpt.restore_latest(abstract)
        assert step == 1
        np.testing.assert_array_equal(restored["w"], np.full((64, 64), 1.0, np.float32))
        # The step can be saved again, and the half-written tmp dir is cleaned up (before the save).
        assert ckpt.save(2, {"w": np.full((64, 64), 2.0, np.float32)})
        assert ckpt.latest_step() == 2
    assert sorted(os.listdir(latest_dir)) == ["1", "2"]


_MULTI_PROCESS_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    pid, port, workdir, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import grain
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from cinjax.checkpointing import Checkpointer
    from cinjax.preemption import PreemptionFlag

    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    local_w = np.arange(4 * pid, 4 * pid + 4, dtype=np.float32).reshape(4, 1)
    state = {
        "w": jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local_w, (8, 1)),
        "b": jax.device_put(np.float32(3.0), NamedSharding(mesh, P())),
    }
    def make_iter():
        return iter(grain.MapDataset.range(100)[pid::2].shuffle(seed=1).to_iter_dataset())
    it = make_iter()
    flag = PreemptionFlag(sync_every=2).install()
    ckpt = Checkpointer(workdir)
    stop_step = None
    for step in range(1, 40):
        next(it)
        if step == 3 and pid == 1:  # only process 1 is told to stop
            os.kill(os.getpid(), signal.SIGTERM if mode == "sigterm" else signal.SIGINT)
        if flag.should_stop(step):
            stop_step = step
            ckpt.save(step, state, data_iter=it)
            break
        time.sleep(0.05)
    expected = [next(it) for _ in range(3)]
    ckpt.close()
    it2 = make_iter()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with Checkpointer(workdir) as ckpt:
        step, restored, _ = ckpt.restore_latest(abstract, data_iter=it2)
    shards = np.concatenate([np.asarray(s.data) for s in restored["w"].addressable_shards])
    print("RESULT" + json.dumps({"stop": stop_step, "restored": step, "w": shards.ravel().tolist(),
                                 "next_ok": [next(it2) for _ in range(3)] == expected}), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["flag", pytest.param("sigterm", marks=pytest.mark.slow)])
def test_two_processes_agree_on_stop_step(tmp_path, mode):
    """One process gets the stop request; both stop, save and restore at the same step.

    ``flag``: a local stop request (SIGINT) reaches the other process through the
    periodic all-gather. ``sigterm``: JAX's preemption service catches SIGTERM and both processes
    reach its sync point together.
    """
    port = _free_port()
    env = dict(
        os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MULTI_PROCESS_CHILD, str(i), str(port), str(tmp_path), mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]
        results.append(json.loads(out.split("RESULT")[-1]))
    stops = {r["stop"] for r in results}
    assert len(stops) == 1 and None not in stops, results
    (stop,) = stops
    assert stop >= 4 and all(r["restored"] == stop and r["next_ok"] for r in results)
    assert [r["w"] for r in results] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    assert sorted(os.listdir(tmp_path / "checkpoints" / "latest" / str(stop) / "data_iter")) == [
        "commit_success.txt",
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]


def test_workdir_preflight(tmp_path):
    def check_workdir_writable(path, min_free_bytes=1):
        return Workdir(path).check(min_free_bytes)

    assert check_workdir_writable(tmp_path / "new" / "dir", min_free_bytes=1) > 0
    assert os.path.isdir(tmp_path / "new" / "dir")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(WorkdirError, match="Cannot create workdir"):
        check_workdir_writable(blocker / "sub")
    with pytest.raises(WorkdirError, match="not a directory"):
        check_workdir_writable(blocker)
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses regular files
        read_only = "/sys/fs"
    else:
        read_only = tmp_path / "read_only"
        read_only.mkdir()
        read_only.chmod(0o500)
    with pytest.raises(WorkdirError, match="is not writable"):
        check_workdir_writable(read_only)
    with pytest.raises(WorkdirError, match="GiB free"):
        check_workdir_writable(tmp_path, min_free_bytes=1 << 62)


def test_preemption_flag_from_signals():
    before_term = signal.getsignal(signal.SIGTERM)
    before_int = signal.getsignal(signal.SIGINT)
    with PreemptionFlag() as flag:
        assert not flag.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.should_stop(2)
        assert flag.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C after a stop request: stop now
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before_term
    assert signal.getsignal(signal.SIGINT) is before_int

    with PreemptionFlag(signals=(signal.SIGINT,)) as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.should_stop(1) and flag.signal_name == "SIGINT"


def _damage(step_dir, kind):
    state = step_dir / "state"
    files = sorted((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if kind == "delete_data":
        files[-1].unlink()
    elif kind == "truncate_data":
        files[-1].write_bytes(files[-1].read_bytes()[: files[-1].stat().st_size // 2])
    elif kind == "zero_data":
        data = bytearray(files[-1].read_bytes())
        data[: min(400, len(data))] = bytes(min(400, len(data)))
        files[-1].write_bytes(bytes(data))
    elif kind == "delete_manifest":
        next(p for p in files if p.name == "manifest.ocdbt").unlink()
    elif kind == "delete_metadata":
        (state / "_METADATA").unlink()
    elif kind == "delete_state":
        shutil.rmtree(state)
    elif kind == "empty_step":
        for p in step_dir.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif kind == "delete_meta":
        shutil.rmtree(step_dir / "meta")
    elif kind == "delete_iterator":
        (step_dir / "data_iter" / "process_0-of-1.json").unlink()


@pytest.mark.parametrize(
    "kind",
    [
        "delete_data",
        "truncate_data",
        "zero_data",
        "delete_manifest",
        "delete_metadata",
        "delete_state",
        "empty_step",
        "delete_meta",
        "delete_iterator",
    ],
)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, state, kind, caplog):
    it = _iterator()
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        next(it)
        ckpt.save(1, state, data_iter=it)
        expected = [next(it) for _ in range(3)]
        ckpt.save(2, jax.tree.map(lambda x: x, _make_state(seed=1)), data_iter=it)
    _damage(tmp_path / "checkpoints" / "latest" / "2", kind)
    fresh = _iterator()
    with Checkpointer(tmp_path) as ckpt:
        step, restored, _ = ckpt.restore_latest(_abstract(state), data_iter=fresh)
        assert ckpt.latest_step() == 1
    assert step == 1 and "Checkpoint" in caplog.text and "damaged" in caplog.text
    _assert_tree_equal(restored, state)
    assert [next(fresh) for _ in range(3)] == expected
    latest = os.listdir(tmp_path / "checkpoints" / "latest")
    assert "2" not in latest and any(n.startswith("damaged-2-") for n in latest)


def test_checkpoint_of_another_model_is_a_mismatch_not_damage(tmp_path, state):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)
    other = dict(
        state, params={"conv": {"kernel": jnp.zeros((3, 3, 3, 2, 8))}, "head": state["params"]["head"]}
    )
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointMismatchError, match="another --workdir"):
            ckpt.restore_latest(_abstract(other))
    assert os.listdir(tmp_path / "checkpoints" / "latest") == ["1"]  # intact, not moved aside


def test_eval_restore_skips_a_damaged_step_and_says_which_it_used(tmp_path, state, caplog):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
    _damage(tmp_path / "checkpoints" / "latest" / "2", "truncate_data")
    variables = restore_inference_variables(tmp_path, prefer="best")  # no best: falls back to latest
    assert variables.step == 1 and variables.directory.endswith("latest/1")
    assert "No best checkpoint" in caplog.text and "damaged" in caplog.text


def test_workdir_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, caplog):
    run = Workdir(tmp_path)
    with run.lock():
        owner = json.load(open(tmp_path / ".lock"))
        assert owner["pid"] == os.getpid()
        (tmp_path / ".lock").write_text(json.dumps(dict(owner, pid=1)))  # pid 1 is alive
        with pytest.raises(WorkdirError, match="in use by another trainer: pid 1"):
            with Workdir(tmp_path).lock():
                pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps(dict(owner, pid=dead.pid)))
    with Workdir(tmp_path).lock():
        assert json.load(open(tmp_path / ".lock"))["pid"] == os.getpid()
    assert "not running" in caplog.text and not (tmp_path / ".lock").exists()
