"""Checkpoints (orbax) for resume and best-by-Dice, pre-flight workdir checks and preemption.

Layout under ``<workdir>/checkpoints/``::

        latest/<step>/state      train-state pytree (params, opt_state, step, rng, ...)
        latest/<step>/data_iter  grain iterator state, one JSON per process
        latest/<step>/meta       small JSON: config hash, metrics, time
        best/<step>/state        state (or params) with the best validation Dice so far
        best/<step>/meta

"latest" and "best" are two separate orbax ``CheckpointManager``s: with ``best_fn`` and
``max_to_keep`` in one manager the newest checkpoint can be deleted when it is not the best,
and a resume after a crash would then lose work. Every save goes through orbax's atomic
"write to a tmp dir, then rename" finalize, so a process killed mid-save leaves the newest
complete checkpoint untouched; the leftover tmp dir is ignored and cleaned up on the next start.

Typical use in the training loop::

        ckpt = Checkpointer(workdir, max_to_keep=3, save_every_steps=1000, config_hash=h)
        restored = ckpt.restore_latest(abstract_state, data_iter=it)
        step, state = restored if restored else (0, state)
        with PreemptionFlag() as stop:
            for step in range(step + 1, total + 1):
                ...
                stop_now = stop.should_stop(step)
                ckpt.save(step, state, data_iter=it, metrics=m, force=stop_now or step == total)
                if stop_now:
                    break
        ckpt.close()
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils

from cinjax.metrics import json_safe

PyTree = Any
log = logging.getLogger(__name__)

LATEST_DIR = "latest"
BEST_DIR = "best"
STATE_ITEM = "state"
DATA_ITER_ITEM = "data_iter"
META_ITEM = "meta"
BEST_METRIC = "dice"


class WorkdirError(RuntimeError):
    """The workdir cannot be used (not writable, not enough free disk)."""


class CheckpointNotFoundError(FileNotFoundError):
    """No restorable checkpoint exists at the given path."""


# ---------------------------------------------------------------------------
# Pre-flight check.
# ---------------------------------------------------------------------------


def check_workdir_writable(workdir: str | os.PathLike[str], min_free_bytes: int = 1 << 30) -> int:
    """Creates ``workdir`` if needed, proves it is writable and has enough free disk.

    Run before training starts so a bad ``--workdir`` fails in seconds, not at the first
    checkpoint hours later. Returns the free bytes on the workdir's filesystem.

    Raises:
        WorkdirError: the directory cannot be created or written, or has less than
            ``min_free_bytes`` free.
    """
    path = os.fspath(workdir)
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


# ---------------------------------------------------------------------------
# Checkpointer.
# ---------------------------------------------------------------------------


class Checkpointer:
    """Saves / restores train state + data-iterator state: keep-latest-N and best-by-Dice.

    Args:
        workdir: the run's workdir; checkpoints live under ``<workdir>/checkpoints/``.
        max_to_keep: how many "latest" checkpoints to keep for resume.
        save_every_steps: ``save()`` writes only at multiples of this (or when ``force``);
            ``None`` saves at every ``save()`` call.
        async_save: write in a background thread (the device→host copy still blocks, so the
            caller may donate or update the state right after ``save`` returns).
        config_hash: stored in every checkpoint's metadata; a resume with a different hash logs
            a warning.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        max_to_keep: int = 3,
        save_every_steps: int | None = None,
        async_save: bool = True,
        config_hash: str | None = None,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
        if save_every_steps is not None and save_every_steps < 1:
            raise ValueError(f"save_every_steps must be >= 1 or None, got {save_every_steps}.")
        self.directory = epath.Path(os.fspath(workdir)) / "checkpoints"
        self.config_hash = config_hash
        self._save_every = save_every_steps
        self._latest = ocp.CheckpointManager(
            self.directory / LATEST_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
                create=True,
            ),
            item_names=(STATE_ITEM, DATA_ITER_ITEM, META_ITEM),
        )
        self._best = ocp.CheckpointManager(
            self.directory / BEST_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                best_fn=lambda metrics: metrics[BEST_METRIC],
                best_mode="max",
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
                create=True,
            ),
            item_names=(STATE_ITEM, META_ITEM),
        )
        best_step = self._best.best_step()
        best_metrics = self._best.metrics(best_step) if best_step is not None else None
        self._best_dice = float(best_metrics[BEST_METRIC]) if best_metrics else -math.inf

    # -- saving ---------------------------------------------------------------

    def _meta(self, step: int, metrics: Mapping[str, Any] | None) -> dict[str, Any]:
        return {
            "step": int(step),
            "config_hash": self.config_hash,
            "metrics": json_safe(dict(metrics or {})),
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "process_count": jax.process_count(),
        }

    def save(
        self,
        step: int,
        state: PyTree,
        data_iter: Any | None = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves a "latest" checkpoint at ``step`` if due (or ``force``); returns whether it did.

        Call on every process with the same arguments (orbax coordinates multi-host writes).
        ``data_iter`` is a grain ``DatasetIterator`` (its state is taken before this returns,
        so the loop may advance it immediately) or None.
        """
        step = int(step)
        if not force and self._save_every is not None and step % self._save_every:
            return False
        if step in self._latest.all_steps():
            return False
        items: dict[str, Any] = {
            STATE_ITEM: ocp.args.StandardSave(state),
            META_ITEM: ocp.args.JsonSave(self._meta(step, metrics)),
        }
        if data_iter is not None:
            items[DATA_ITER_ITEM] = grain_checkpoint.CheckpointSave(data_iter)
        return self._latest.save(step, args=ocp.args.Composite(**items), force=True)

    def save_best(self, step: int, state: PyTree, dice: float) -> bool:
        """Saves ``state`` as the best checkpoint if ``dice`` beats the best so far.

        ``state`` is the full train state or just ``{"params": params}``; restore with the matching
        abstract tree. NaN Dice never counts as best. Returns whether it saved.
        """
        dice = float(dice)
        if not math.isfinite(dice) or dice <= self._best_dice or int(step) in self._best.all_steps():
            return False
        saved = self._best.save(
            int(step),
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardSave(state),
                    META_ITEM: ocp.args.JsonSave(self._meta(step, {BEST_METRIC: dice})),
                }
            ),
            metrics={BEST_METRIC: dice},
            force=True,
        )
        if saved:
            self._best_dice = dice
        return saved

    @property
    def best_dice(self) -> float | None:
        """Validation Dice of the best checkpoint so far (None before the first one)."""
        return None if self._best_dice == -math.inf else self._best_dice

    # -- restoring ------------------------------------------------------------

    def latest_step(self) -> int | None:
        """Newest complete "latest" checkpoint step, or None."""
        return self._latest.latest_step()

    def best_step(self) -> int | None:
        """Step of the best-by-Dice checkpoint, or None."""
        return self._best.best_step()

    def _restore(
        self,
        manager: ocp.CheckpointManager,
        step: int,
        abstract_state: PyTree,
        data_iter: Any | None,
    ) -> PyTree:
        items: dict[str, Any] = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            if (manager.directory / str(step) / DATA_ITER_ITEM).exists():
                items[DATA_ITER_ITEM] = grain_checkpoint.CheckpointRestore(data_iter)
            else:
                log.warning(
                    "Checkpoint %s/%d holds no data-iterator state; the data pipeline starts from its"
                    " beginning.",
                    manager.directory,
                    step,
                )
        items[META_ITEM] = ocp.args.JsonRestore()
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:
            if DATA_ITER_ITEM in items and "process_" in str(e):
                raise ValueError(
                    f"Cannot restore the data-iterator state of {manager.directory}/{step} with"
                    f" {jax.process_count()} processes: it was saved by a different process count ({e})."
                    " Resume with the same number of processes."
                ) from e
            raise
        meta = restored[META_ITEM] or {}
        saved_hash = meta.get("config_hash")
        if self.config_hash and saved_hash and saved_hash != self.config_hash:
            log.warning(
                "Restoring %s/%d saved with config hash %s, current config hash is %s.",
                manager.directory,
                step,
                saved_hash,
                self.config_hash,
            )
        return restored[STATE_ITEM]

    def restore_latest(
        self, abstract_state: PyTree, data_iter: Any | None = None
    ) -> tuple[int, PyTree] | None:
        """Restores the newest checkpoint onto ``abstract_state``'s shapes/dtypes/shardings.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` (e.g.
        ``jax.eval_shape`` of the init, with shardings attached), so restoring onto another mesh
        works. ``data_iter``, if given, is set to the saved position in place.
        Returns ``(step, state)``, or None when there is no checkpoint yet.
        """
        step = self.latest_step()
        if step is None:
            return None
        return step, self._restore(self._latest, step, abstract_state, data_iter)

    def restore_best(self, abstract_state: PyTree) -> tuple[int, PyTree] | None:
        """Restores the best-by-Dice checkpoint; ``(step, state)`` or None if there is none."""
        step = self.best_step()
        if step is None:
            return None
        return step, self._restore(self._best, step, abstract_state, None)

    def metadata(self, step: int | None = None, *, best: bool = False) -> dict[str, Any] | None:
        """The JSON metadata (step, config_hash, metrics, saved_at) of a checkpoint."""
        manager = self._best if best else self._latest
        step = step if step is not None else (manager.best_step() if best else manager.latest_step())
        if step is None:
            return None
        return manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[
            META_ITEM
        ]

    # -- lifecycle --------------------------------------------------------------

    def wait(self) -> None:
        """Blocks until pending async saves are on disk (raises if one failed)."""
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the managers; call on exit (also on error)."""
        self.wait()
        self._latest.close()
        self._best.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Params-only restore for eval / predict.
# ---------------------------------------------------------------------------


def _is_step_dir(path: epath.Path) -> bool:
    return path.name.isdigit() and (path / STATE_ITEM).is_dir()


def _latest_step_dir(manager_dir: epath.Path) -> epath.Path | None:
    steps = [int(p.name) for p in manager_dir.iterdir() if _is_step_dir(p)]
    return manager_dir / str(max(steps)) if steps else None


def resolve_params_checkpoint(path: str | os.PathLike[str], prefer: str = "best") -> tuple[epath.Path, bool]:
    """Finds the orbax pytree directory that holds params under ``path``.

    ``path`` may be a workdir (uses ``checkpoints/<prefer>``, falling back to the other), a
    ``checkpoints/latest`` or ``checkpoints/best`` manager directory (newest step), one step
    directory, or a ``python -m cinjax.convert`` output directory (``DIR/params``).
    Returns ``(pytree_dir, is_train_state)``; for a train state, params are its ``"params"``.
    """
    if prefer not in (BEST_DIR, LATEST_DIR):
        raise ValueError(f"prefer must be 'best' or 'latest', got {prefer!r}.")
    root = epath.Path(os.fspath(path))
    if not root.exists():
        raise CheckpointNotFoundError(f"Checkpoint path {os.fspath(path)!r} does not exist.")
    if (root / "params").is_dir():
        return root / "params", False
    if _is_step_dir(root):
        return root / STATE_ITEM, True
    candidates = [root]
    if (root / "checkpoints").is_dir():
        order = (prefer, LATEST_DIR if prefer == BEST_DIR else BEST_DIR)
        candidates = [root / "checkpoints" / name for name in order]
    for manager_dir in candidates:
        if manager_dir.is_dir():
            step_dir = _latest_step_dir(manager_dir)
            if step_dir is not None:
                return step_dir / STATE_ITEM, True
    raise CheckpointNotFoundError(
        f"No checkpoint found under {os.fspath(path)!r}. Expected a workdir with"
        " checkpoints/{best,latest}/<step>/, a checkpoint step directory, or a"
        " `python -m cinjax.convert` output directory containing params/."
    )


def _restore_entries(
    path: str | os.PathLike[str],
    abstract: Mapping[str, PyTree | None],
    prefer: str,
) -> dict[str, PyTree]:
    """Restores top-level entries (``"params"``, ``"model_state"``) of a checkpoint's state tree.

    Entries a train-state checkpoint does not hold come back as ``{}``; a converted-weights
    directory holds only params.
    """
    tree_dir, is_train_state = resolve_params_checkpoint(path, prefer=prefer)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return _restore_with(handler, tree_dir, is_train_state, abstract)
    finally:
        handler.close()


def _restore_with(
    handler: ocp.PyTreeCheckpointHandler,
    tree_dir: epath.Path,
    is_train_state: bool,
    abstract: Mapping[str, PyTree | None],
) -> dict[str, PyTree]:
    metadata = handler.metadata(tree_dir).tree
    if not is_train_state:
        metadata = {"params": metadata}
    elif not isinstance(metadata, Mapping) or "params" not in metadata:
        found = sorted(metadata) if isinstance(metadata, Mapping) else type(metadata).__name__
        raise CheckpointNotFoundError(
            f"Checkpoint {os.fspath(tree_dir)!r} holds no 'params' entry at its top level (found {found})."
        )
    target, restore_args, missing = {}, {}, {}
    for name, abstract_entry in abstract.items():
        entry_meta = metadata.get(name)
        if not jax.tree.leaves(entry_meta):
            missing[name] = {}
            continue
        if abstract_entry is None:
            target[name] = jax.tree.map(lambda m: np.zeros((), dtype=m.dtype), entry_meta)
            restore_args[name] = jax.tree.map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target[name]
            )
        else:
            target[name] = abstract_entry
            restore_args[name] = ocp.checkpoint_utils.construct_restore_args(abstract_entry)
    if not is_train_state:
        args = ocp.args.PyTreeRestore(item=target["params"], restore_args=restore_args["params"])
        restored = {"params": handler.restore(tree_dir, args=args)}
    else:
        restored = handler.restore(
            tree_dir,
            args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
        )
    return {**missing, **dict(restored)}


def restore_params_only(
    path: str | os.PathLike[str],
    abstract_params: PyTree | None = None,
    *,
    prefer: str = "best",
) -> PyTree:
    """Restores only the model params from a checkpoint (see ``resolve_params_checkpoint``).

    With ``abstract_params`` (``jax.ShapeDtypeStruct`` leaves with shardings) the params land on
    those shardings and shapes/dtypes are checked; without it they come back as host numpy
    arrays, independent of the topology they were saved on. The optimizer state is never read.
    """
    return _restore_entries(path, {"params": abstract_params}, prefer)["params"]


def restore_inference_variables(
    path: str | os.PathLike[str], *, prefer: str = "best"
) -> tuple[PyTree, PyTree]:
    """``(params, model_state)`` as host numpy arrays, for models with non-param collections.

    ``model_state`` (e.g. BatchNorm ``batch_stats``) is the state tree's ``"model_state"`` entry,
    ``{}`` when the checkpoint has none (instance-norm models, converted weights).
    """
    restored = _restore_entries(path, {"params": None, "model_state": None}, prefer)
    return restored["params"], restored["model_state"]


# ---------------------------------------------------------------------------
# Preemption / Ctrl-C.
# ---------------------------------------------------------------------------


def _jax_preemption_service_active() -> bool:
    """True when jax.distributed runs its preemption sync service (it owns SIGTERM then)."""
    return jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)


class PreemptionFlag:
    """Turns SIGTERM / SIGINT into a flag the training loop polls to save and exit cleanly.

    The handler only sets a flag; the loop calls ``should_stop(step)`` once per step and, when
    it returns True, saves a checkpoint (``force=True``) and leaves the loop. A second SIGINT
    while the flag is already set raises ``KeyboardInterrupt`` (Ctrl-C twice = stop now).

    Multi-host: every process must stop at the same step, or the next collective hangs.
    ``should_stop`` is then a collective decision: JAX's preemption sync point (JAX's
    distributed service handles SIGTERM itself, so this class leaves SIGTERM to it) OR any
    process's local flag, gathered every ``sync_every`` steps. Call it on every process at
    every step.
    """

    def __init__(
        self,
        signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
        *,
        sync_every: int = 10,
    ):
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}.")
        self._signals = tuple(signals)
        self._sync_every = sync_every
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self.signal_name: str | None = None

    def install(self) -> PreemptionFlag:
        """Installs the handlers (main thread only); keeps the previous ones for ``uninstall``."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionFlag.install() must be called from the main thread.")
        for sig in self._signals:
            if sig == signal.SIGTERM and _jax_preemption_service_active():
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restores the handlers that were active before ``install``."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionFlag:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT and self._event.is_set():
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self._event.set()
        log.warning(
            "Received %s: will save a checkpoint and stop at the next step boundary.", self.signal_name
        )

    def set(self) -> None:
        """Requests a stop programmatically (as a signal would)."""
        self._event.set()

    @property
    def is_set(self) -> bool:
        """Whether this process has received a stop request (no multi-host agreement)."""
        return self._event.is_set()

    def should_stop(self, step: int) -> bool:
        """Whether the loop should save and stop after ``step``; same answer on every process."""
        if jax.process_count() == 1:
            return self._event.is_set()
        stop = False
        if _jax_preemption_service_active():
            with contextlib.suppress(RuntimeError):
                stop = multihost_utils.reached_preemption_sync_point(int(step))
        if int(step) % self._sync_every == 0:
            flags = multihost_utils.process_allgather(np.asarray(self._event.is_set(), np.int32))
            stop = stop or bool(np.any(flags))
        return stop
