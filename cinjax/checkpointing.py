"""Checkpoints (orbax): "latest" for resume, "best by validation Dice", and restoring for inference.

Layout under ``<workdir>/checkpoints/``::

        latest/<step>/state      train-state pytree (params, opt_state, step, rng, ...)
        latest/<step>/data_iter  grain iterator state, one JSON per process
        latest/<step>/meta       small JSON: step, config hash, loop state (e.g. the plateau schedule), time
        best/<step>/state        the variables inference needs, at the best validation Dice so far
        best/<step>/meta

"latest" and "best" are two separate orbax ``CheckpointManager``s: with ``best_fn`` and ``max_to_keep``
in one manager the newest checkpoint can be deleted when it is not the best, and a resume after a crash
would then lose work. Every save goes through orbax's atomic "write to a tmp dir, then rename" finalize,
so a process killed mid-save leaves the newest complete checkpoint untouched; the leftover tmp dir is
ignored and cleaned up on the next start.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from grain import checkpoint as grain_checkpoint

from cinjax.metrics import json_safe
from cinjax.workdir import CHECKPOINTS, CONVERTED_PARAMS

PyTree = Any
log = logging.getLogger(__name__)

LATEST_DIR = "latest"
BEST_DIR = "best"
STATE_ITEM = "state"
DATA_ITER_ITEM = "data_iter"
META_ITEM = "meta"
BEST_METRIC = "dice"


class CheckpointNotFoundError(FileNotFoundError):
    """No restorable checkpoint exists at the given path."""


class Restored(NamedTuple):
    """What :meth:`Checkpointer.restore_latest` read: the step, the state and the saved metadata."""

    step: int
    state: PyTree
    meta: dict[str, Any]


class Checkpointer:
    """Saves / restores train state + data-iterator state: keep-latest-N and best-by-Dice.

    Args:
        workdir: the run's workdir; checkpoints live under ``<workdir>/checkpoints/``.
        max_to_keep: how many "latest" checkpoints to keep for resume.
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
        async_save: bool = True,
        config_hash: str | None = None,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
        self.directory = epath.Path(os.fspath(workdir)) / CHECKPOINTS
        self.config_hash = config_hash
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

    def _meta(self, step: int, extra: Mapping[str, Any] | None) -> dict[str, Any]:
        return {
            **json_safe(dict(extra or {})),
            "step": int(step),
            "config_hash": self.config_hash,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "process_count": jax.process_count(),
        }

    def save(
        self, step: int, state: PyTree, data_iter: Any | None = None, meta: Mapping[str, Any] | None = None
    ) -> bool:
        """Saves a "latest" checkpoint at ``step`` (unless one exists); returns whether it did.

        Call on every process with the same arguments (orbax coordinates multi-host writes).
        ``data_iter`` is a grain ``DatasetIterator`` (its state is taken before this returns, so the
        loop may advance it immediately) or None. ``meta`` (JSON-able) goes into the checkpoint's
        metadata and comes back from :meth:`restore_latest`.
        """
        step = int(step)
        if step in self._latest.all_steps():
            return False
        items: dict[str, Any] = {
            STATE_ITEM: ocp.args.StandardSave(state),
            META_ITEM: ocp.args.JsonSave(self._meta(step, meta)),
        }
        if data_iter is not None:
            items[DATA_ITER_ITEM] = grain_checkpoint.CheckpointSave(data_iter)
        return self._latest.save(step, args=ocp.args.Composite(**items), force=True)

    def save_best(self, step: int, state: PyTree, dice: float) -> bool:
        """Saves ``state`` as the best checkpoint if ``dice`` beats the best so far.

        ``state`` holds what inference restores (``{"params", "model_state"}``). NaN Dice never
        counts as best. Returns whether it saved.
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

    def restore_latest(self, abstract_state: PyTree, data_iter: Any | None = None) -> Restored | None:
        """Restores the newest checkpoint onto ``abstract_state``'s shapes/dtypes/shardings.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` (e.g.
        ``jax.eval_shape`` of the init, with shardings attached), so restoring onto another mesh
        works. ``data_iter``, if given, is set to the saved position in place.
        Returns ``(step, state, meta)``, or None when there is no checkpoint yet.
        """
        step = self.latest_step()
        if step is None:
            return None
        manager = self._latest
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
        meta = dict(restored[META_ITEM] or {})
        saved_hash = meta.get("config_hash")
        if self.config_hash and saved_hash and saved_hash != self.config_hash:
            log.warning(
                "Restoring %s/%d saved with config hash %s, current config hash is %s.",
                manager.directory,
                step,
                saved_hash,
                self.config_hash,
            )
        return Restored(step, restored[STATE_ITEM], meta)

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
# Restore for eval / predict: the variables only, as host arrays.
# ---------------------------------------------------------------------------


def _is_step_dir(path: epath.Path) -> bool:
    return path.name.isdigit() and (path / STATE_ITEM).is_dir()


def _latest_step_dir(manager_dir: epath.Path) -> epath.Path | None:
    steps = [int(p.name) for p in manager_dir.iterdir() if _is_step_dir(p)]
    return manager_dir / str(max(steps)) if steps else None


def resolve_checkpoint(path: str | os.PathLike[str], prefer: str = "best") -> tuple[epath.Path, bool]:
    """Finds the orbax pytree directory that holds the params under ``path``.

    ``path`` may be a workdir (uses ``checkpoints/<prefer>``, falling back to the other), a
    ``checkpoints/latest`` or ``checkpoints/best`` manager directory (newest step), one step
    directory, or a ``python -m cinjax.convert`` output directory (``DIR/params``).
    Returns ``(pytree_dir, is_state_tree)``; a state tree holds the params under ``"params"``.
    """
    if prefer not in (BEST_DIR, LATEST_DIR):
        raise ValueError(f"prefer must be 'best' or 'latest', got {prefer!r}.")
    root = epath.Path(os.fspath(path))
    if not root.exists():
        raise CheckpointNotFoundError(f"Checkpoint path {os.fspath(path)!r} does not exist.")
    if (root / CONVERTED_PARAMS).is_dir():
        return root / CONVERTED_PARAMS, False
    if _is_step_dir(root):
        return root / STATE_ITEM, True
    candidates = [root]
    if (root / CHECKPOINTS).is_dir():
        order = (prefer, LATEST_DIR if prefer == BEST_DIR else BEST_DIR)
        candidates = [root / CHECKPOINTS / name for name in order]
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


def restore_inference_variables(
    path: str | os.PathLike[str], *, prefer: str = "best"
) -> tuple[PyTree, PyTree]:
    """``(params, model_state)`` of a checkpoint (see :func:`resolve_checkpoint`) as host numpy arrays,
    independent of the topology they were saved on; the optimizer state is never read.

    ``model_state`` (e.g. BatchNorm ``batch_stats``) is the state tree's ``"model_state"`` entry,
    ``{}`` when the checkpoint has none (instance-norm models, converted weights).
    """
    tree_dir, is_state_tree = resolve_checkpoint(path, prefer=prefer)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        metadata = handler.metadata(tree_dir).tree
        if not is_state_tree:
            metadata = {"params": metadata}
        elif not isinstance(metadata, Mapping) or "params" not in metadata:
            found = sorted(metadata) if isinstance(metadata, Mapping) else type(metadata).__name__
            raise CheckpointNotFoundError(
                f"Checkpoint {os.fspath(tree_dir)!r} holds no 'params' entry at its top level "
                f"(found {found})."
            )
        entries = {name: metadata.get(name) for name in ("params", "model_state")}
        target = {
            name: jax.tree.map(lambda m: np.zeros((), dtype=m.dtype), meta)
            for name, meta in entries.items()
            if jax.tree.leaves(meta)
        }
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        if is_state_tree:
            args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
            restored = dict(handler.restore(tree_dir, args=args))
        else:
            args = ocp.args.PyTreeRestore(item=target["params"], restore_args=restore_args["params"])
            restored = {"params": handler.restore(tree_dir, args=args)}
    finally:
        handler.close()
    return restored["params"], restored.get("model_state", {})
