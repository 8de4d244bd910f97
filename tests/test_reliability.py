"""Faults and bad input through the real CLI on a tiny phantom: nothing silently wrong, nothing lost.

Each test injects one fault that used to give a silent wrong result or lose work (a damaged newest
checkpoint, SIGTERM while the final checkpoint is being written, a non-finite update, a second trainer
on the workdir, a resume with another model or a changed config) and checks the behaviour a user needs.
The demo config trains on 1, 3 and 8 devices (its batch adapts to the device count).
"""

import json
import shutil
import signal
import time

import jax
import numpy as np
import pytest
from test_main import _cli, _metrics, _run, _train_losses

from cinjax import checkpointing

EXIT_PREEMPTED = 75


@pytest.fixture(scope="module")
def data_args(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    cache = tmp_path_factory.mktemp("cache")
    return [
        f"--config.data.root={root}",
        f"--config.data.cache_dir={cache}",
        "--config.data.phantom.num_ct=3",
        "--config.data.phantom.num_mr=3",
        "--config.data.phantom.num_val=1",
        "--config.data.phantom.num_test=1",
        "--config.data.spacing=(4.0,4.0,4.0)",
        "--config.data.roi=(16,16,16)",
        "--config.data.preprocess_workers=0",
        "--config.model.channels=(4,8)",
        "--config.model.strides=(1,2)",
        "--config.loader.prefetch=0",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.final_eval=False",
        "--config.train.min_free_gb=0.01",
        "--config.optim.schedule.warmup_steps=1",
        "--config.eval.panels=False",
        "--config.eval.distances=False",
    ]


@pytest.fixture(scope="module")
def run4(tmp_path_factory, data_args):
    """A finished 4-step run with a checkpoint at every step."""
    w = tmp_path_factory.mktemp("run4")
    _run(w, _with(data_args, "--config.train.num_steps=4", "--config.train.checkpoint_every=1"))
    return w


def _with(args, *overrides):
    """``args`` with ``--config.key=value`` overrides replacing the same keys (a flag given twice keeps
    neither value)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [a for a in args if a.split("=", 1)[0] not in keys] + list(overrides)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("devices", [1, pytest.param(3, marks=pytest.mark.slow), 8])
def test_demo_trains_on_any_device_count(data_args, tmp_path, devices):
    w = tmp_path / f"d{devices}"
    out = _run(
        w,
        _with(data_args, "--config.train.num_steps=1", "--config.train.checkpoint_every=0"),
        devices=devices,
    )
    batch = {1: 4, 3: 6, 8: 8}[devices]  # auto: the smallest multiple of the devices >= 4
    assert f"global_batch_size={batch}" in out
    assert checkpointing.Checkpointer(w).latest_step() == 1


def test_damaged_newest_checkpoint_resumes_from_the_previous_step(run4, data_args, tmp_path):
    w = _copy(run4, tmp_path / "w")
    data = sorted((w / "checkpoints" / "latest" / "4" / "state").rglob("*"), key=lambda p: p.stat().st_size)
    victim = [p for p in data if p.is_file()][-1]  # the largest file of the newest state: its arrays
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    out = _run(w, _with(data_args, "--config.train.num_steps=5", "--config.train.checkpoint_every=1"))
    assert "damaged" in out and "Resumed from step 3" in out
    steps = sorted(int(p.name) for p in (w / "checkpoints" / "latest").iterdir() if p.name.isdigit())
    assert steps[-1] == 5 and any(
        p.name.startswith("damaged-4") for p in (w / "checkpoints" / "latest").iterdir()
    )
    assert sorted(_train_losses(w)) == [1, 2, 3, 4, 5]  # no step logged twice


def test_resume_with_another_model_is_refused_naming_the_key(run4, data_args, tmp_path):
    w = _copy(run4, tmp_path / "w")
    proc = _cli(w, _with(data_args, "--config.train.num_steps=5", "--config.model.channels=(8,16)"))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:]
    assert "model.channels" in out and "another --workdir" in out and "Traceback" not in out
    assert checkpointing.Checkpointer(w).latest_step() == 4  # nothing was touched


def test_resume_with_a_changed_key_is_recorded(run4, data_args, tmp_path):
    w = _copy(run4, tmp_path / "w")
    out = _run(
        w,
        data_args
        + ["--config.train.num_steps=5", "--config.train.checkpoint_every=1", "--config.optim.lr=0.001"],
    )
    assert "optim.lr" in out
    history = [json.loads(line) for line in open(w / "config_history.jsonl")]
    assert [h["start_step"] for h in history] == [0, 4]
    assert "optim.lr" in history[1]["changed"] and history[1]["config"]["optim"]["lr"] == 0.001
    assert json.load(open(w / "config.json"))["optim"]["lr"] == 0.001


def test_non_finite_update_is_never_saved(data_args, tmp_path):
    """An lr beyond float32 overflows the update of a finite gradient: stop at step 1, save nothing."""
    w = tmp_path / "w"
    proc = _cli(
        w,
        data_args
        + [
            "--config.train.num_steps=5",
            "--config.train.checkpoint_every=1",
            "--config.optim.lr=1e39",
            "--config.optim.schedule.name=constant",
        ],
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "at step 1" in out and "No checkpoint was written yet" in out
    assert checkpointing.Checkpointer(w).latest_step() is None


def test_second_trainer_is_refused(data_args, tmp_path):
    w = tmp_path / "w"
    first = _cli(w, _with(data_args, "--config.train.num_steps=100000", "--config.train.checkpoint_every=0"))
    try:
        deadline = time.time() + 600
        while not (w / "metrics.jsonl").exists() or not _metrics(w):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        second = _cli(w, _with(data_args, "--config.train.num_steps=3"))
        out, _ = second.communicate(timeout=600)
        assert second.returncode == 1, out[-3000:]
        assert f"pid {first.pid}" in out and "another trainer" in out
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    assert first.returncode == EXIT_PREEMPTED  # saved and stopped: rerun to resume
    assert not (w / ".lock").exists()


def test_sigterm_while_the_final_checkpoint_is_written_commits_it(data_args, tmp_path):
    """SIGTERM as the async save of the last step runs (the final evaluation would start next)."""
    w = tmp_path / "w"
    proc = _cli(
        w,
        data_args
        + [
            "--config.train.num_steps=3",
            "--config.train.checkpoint_every=0",
            "--config.train.final_eval=True",
            "--config.train.async_checkpoint=True",
        ],
    )
    latest = w / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not (latest.exists() and any(p.name.startswith("3") for p in latest.iterdir())):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode in (0, EXIT_PREEMPTED), out[-3000:]
    assert checkpointing.Checkpointer(w).latest_step() == 3  # committed, not a tmp dir
    params = checkpointing.restore_inference_variables(w, prefer="latest").params
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
