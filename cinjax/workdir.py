"""The workdir (run directory) layout in one place, and the pre-flight check every mode runs.

A training workdir::

    config.json          the resolved config
    metrics.jsonl        one JSON object per logged train step / evaluation
    tb/                  TensorBoard event files
    checkpoints/latest/  resume checkpoints (state + data-iterator position)
    checkpoints/best/    best by validation Dice
    eval/results.json    metrics of the last evaluation
    eval/panels/*.png    image / ground truth / prediction mid-slices per modality
    predictions/*.nii.gz predict mode (or train with predict.after_train)

A ``python -m cinjax.convert`` directory (converted MI-Seg weights) holds ``params/`` (orbax),
``config.json`` (the model config), ``model_config.py`` and ``conversion.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
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


class WorkdirError(RuntimeError):
    """The workdir cannot be used (not writable, not enough free disk)."""


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

    def save_config(self, config: ml_collections.ConfigDict) -> None:
        """Write the resolved config as ``config.json``."""
        if is_main_process():
            with open(self.config_path, "w") as f:
                f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    def write_results(self, results: Mapping[str, Any]) -> str:
        """Write ``eval/results.json`` (strict JSON: NaN as null, inf as "inf"); returns its path."""
        path = self.results_path
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
