"""The workdir (run directory) layout in one place, and the pre-flight check every mode runs.

A training workdir::

    config.json          the resolved config
    config_history.jsonl the config of every start / resume, with the step it applies from
    .lock                the training process that owns the workdir (pid, host, start time)
    metrics.jsonl        one JSON object per logged train step / evaluation
    tb/                  TensorBoard event files
    checkpoints/latest/  resume checkpoints (state + data-iterator position)
    checkpoints/best/    best by validation Dice
    inference.json       everything inference needs (cinjax.runspec): model, modalities, preprocessing
    postprocessing.json  the largest-component decision of the final validation (cinjax.postprocess)
    eval/results.json    metrics of the last evaluation
    eval/panels/*.png    image / ground truth / prediction mid-slices per modality
    eval/<split>_<checkpoint>_step<N>/  one mode=eval run (results.json, config.json, panels/)
    predictions/*.nii.gz predict mode (or train with predict.after_train); predict.json says how

A ``python -m cinjax.convert`` directory (converted MI-Seg weights) holds ``params/`` (orbax),
``config.json`` (the model config), ``model_config.py``, ``conversion.json`` and ``inference.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections

from cinjax.distributed import is_main_process
from cinjax.metrics import json_safe

CONFIG = "config.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
EVAL = "eval"
RESULTS = "results.json"
PANELS = "panels"
PREDICTIONS = "predictions"
# A converted-weights directory.
CONVERTED_PARAMS = "params"
CONVERSION = "conversion.json"
MODEL_CONFIG_PY = "model_config.py"


INFERENCE = "inference.json"  # what inference needs (cinjax.runspec)
POSTPROCESSING = "postprocessing.json"  # the post-processing decision taken on validation
LOCK = ".lock"
CONFIG_HISTORY = "config_history.jsonl"


class WorkdirError(RuntimeError):
    """The workdir cannot be used (not writable, not enough free disk, in use by another trainer)."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class Workdir:
    """Paths of one run directory; writing helpers act on the main process only."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))

    def __repr__(self) -> str:
        return f"Workdir({self.root!r})"

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def config_path(self) -> str:
        return self.path(CONFIG)

    @property
    def results_path(self) -> str:
        return self.path(EVAL, RESULTS)

    @property
    def panels_dir(self) -> str:
        return self.path(EVAL, PANELS)

    @property
    def predictions_dir(self) -> str:
        return self.path(PREDICTIONS)

    def check(self, min_free_bytes: int = 1 << 30) -> int:
        """Create the directory if needed, prove it is writable and has enough free disk.

        Run before any work so a bad ``--workdir`` fails in seconds, not at the first checkpoint hours
        later. Returns the free bytes on the workdir's filesystem.

        Raises:
            WorkdirError: the directory cannot be created or written, or has less than
                ``min_free_bytes`` free.
        """
        path = self.root
        if os.path.exists(path) and not os.path.isdir(path):
            raise WorkdirError(f"Workdir {path!r} exists but is not a directory. Pass a directory path.")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise WorkdirError(
                f"Cannot create workdir {path!r}: {e.strerror or e}. Pass a --workdir you can write to."
            ) from e
        try:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".cinjax_write_probe_") as f:
                f.write(b"ok")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise WorkdirError(
                f"Workdir {path!r} is not writable: {e.strerror or e}. Fix its permissions or pass another"
                " --workdir."
            ) from e
        free = shutil.disk_usage(path).free
        if free < min_free_bytes:
            raise WorkdirError(
                f"Workdir {path!r} has {free / 2**30:.2f} GiB free, less than the"
                f" {min_free_bytes / 2**30:.2f} GiB needed for checkpoints and logs. Free disk space,"
                " pass another --workdir, or lower config.train.min_free_gb."
            )
        return free

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Own the workdir for one training run: a second trainer on it is refused.

        ``<workdir>/.lock`` holds the owner's pid, host and start time. A lock left by a process that no
        longer runs on this host is taken over with a warning; one held by a live process, or by another
        host (whose processes cannot be checked from here), is refused naming its owner. Only process 0
        takes the lock. Released on exit, also on error.
        """
        if not is_main_process():
            yield
            return
        path = self.path(LOCK)
        mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": sys.argv,
        }
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over(path, mine)
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                with open(path) as f:
                    if json.load(f).get("pid") == mine["pid"]:
                        os.remove(path)

    def _take_over(self, path: str, mine: dict[str, Any]) -> None:
        """Replace a stale lock, or raise :class:`WorkdirError` naming the live owner."""
        try:
            with open(path) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            owner = {}
        pid, host = owner.get("pid"), owner.get("host")
        if host not in (None, mine["host"]):
            raise WorkdirError(
                f"Workdir {self.root!r} is in use by pid {pid} on host {host} (since "
                f"{owner.get('started')}). Wait for that run to end or pass another --workdir; if it is "
                f"gone, delete {path}."
            )
        if isinstance(pid, int) and pid != mine["pid"] and _process_alive(pid):
            raise WorkdirError(
                f"Workdir {self.root!r} is in use by another trainer: pid {pid} on {host} (since "
                f"{owner.get('started')}). Wait for it to end, stop it, or pass another --workdir."
            )
        logging.warning(
            "Taking over the lock of %s: its owner (pid %s on %s) is not running.", self.root, pid, host
        )
        tmp = f"{path}.{mine['pid']}"
        with open(tmp, "w") as f:
            json.dump(mine, f)
        os.replace(tmp, path)

    def record_config(
        self, config: ml_collections.ConfigDict, start_step: int, changed: Mapping[str, Any]
    ) -> None:
        """Write ``config.json`` (the config in force) and append it to ``config_history.jsonl``, with the
        step it applies from and the keys that changed: the record of how every step was trained."""
        if not is_main_process():
            return
        self.save_config(config)
        entry = {
            "start_step": int(start_step),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "changed": json_safe(dict(changed)),
            "config": json.loads(config.to_json_best_effort()),
        }
        with open(self.path(CONFIG_HISTORY), "a") as f:
            f.write(json.dumps(entry) + "\n")

    def eval_dir(self, tag: str) -> str:
        """``eval/<tag>/``: the output of one ``mode=eval`` run."""
        return self.path(EVAL, tag)

    def save_config(self, config: ml_collections.ConfigDict, path: str | None = None) -> None:
        """Write the resolved config as ``config.json`` (or ``path``)."""
        if is_main_process():
            path = path or self.config_path
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    def write_results(self, results: Mapping[str, Any], path: str | None = None) -> str:
        """Write ``eval/results.json`` (or ``path``; strict JSON: NaN as null, inf as "inf"); returns its
        path."""
        path = path or self.results_path
        if is_main_process():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(json_safe(results), f, indent=1)
        return path


def is_converted(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a ``python -m cinjax.convert`` output directory."""
    return os.path.isfile(os.path.join(os.fspath(path), CONVERSION))


def read_converted_model_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The model config (``build_model`` input) of a ``python -m cinjax.convert`` directory."""
    with open(os.path.join(os.fspath(path), CONFIG)) as f:
        return json.load(f)
