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
from cinjax.steps import INFO_NCE_HEAD
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


class CheckpointMismatchError(ValueError):
    """An intact checkpoint that does not fit this config (another model, optimizer or process count)."""


def _cause(e: BaseException) -> str:
    """The first line of an exception's message (orbax / tensorstore errors run to hundreds of lines)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def multihost_sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _check_params_fit(state_dir: epath.Path, abstract_state: PyTree) -> None:
    """Compare the params a checkpoint stores with the ones this config builds, before reading any array:
    another model is a :class:`CheckpointMismatchError` naming the first differences. Unreadable metadata
    is left to the restore (damage)."""
    want = getattr(abstract_state, "params", None)
    if want is None:
        return
    handler = ocp.PyTreeCheckpointHandler()
    try:
        stored = handler.metadata(state_dir).tree
    except Exception:  # damaged metadata: the restore fails and the step is skipped as damaged
        return
    finally:
        handler.close()
    if not isinstance(stored, Mapping) or "params" not in stored:
        return
    have = {
        _names(p): tuple(getattr(v, "shape", ()))
        for p, v in jax.tree_util.tree_flatten_with_path(stored["params"])[0]
    }
    need = {_names(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    diffs = [f"{'/'.join(k)}: missing" for k in need if k not in have]
    diffs += [f"{'/'.join(k)}: not in this model" for k in have if k not in need]
    diffs += [
        f"{'/'.join(k)}: stored {have[k]}, model {need[k]}" for k in need if k in have and have[k] != need[k]
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"{state_dir.parent} holds the params of another model ({len(diffs)} differences, e.g. "
            f"{'; '.join(diffs[:3])}): the model config differs from the run's. Use the run's config, or "
            "pass another --workdir to start a new run."
        )


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

    def latest_meta(self) -> tuple[int, dict[str, Any]] | None:
        """``(step, metadata)`` of the newest "latest" checkpoint whose metadata reads, or None."""
        for step in sorted(self._latest.all_steps(), reverse=True):
            try:
                meta = self._latest.restore(
                    step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
                )
            except Exception:  # a damaged step: restore_latest reports and skips it
                continue
            return step, dict(meta[META_ITEM] or {})
        return None

    def restore_latest(self, abstract_state: PyTree, data_iter: Any | None = None) -> Restored | None:
        """Restores the newest checkpoint that restores completely onto ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` (e.g.
        ``jax.eval_shape`` of the init, with shardings attached), so restoring onto another mesh
        works. ``data_iter``, if given, is set to the saved position in place.

        A step that cannot be read (a deleted, truncated or zeroed file, a missing manifest, metadata
        or iterator state, an empty step directory) is moved aside to ``latest/damaged-<step>`` with a
        warning naming it and what failed, and the previous step is tried: training resumes from the
        newest intact checkpoint instead of failing. A checkpoint of another model or optimizer
        (shapes or structure that do not match) raises :class:`CheckpointMismatchError`.
        Returns ``(step, state, meta)``, or None when there is no checkpoint yet.
        """
        damaged = []
        for step in sorted(self._latest.all_steps(), reverse=True):
            try:
                restored = self._restore_step(step, abstract_state, data_iter)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # any read failure: this step cannot be trusted
                log.warning(
                    "Checkpoint %s/%d is damaged and is skipped: %s", self._latest.directory, step, _cause(e)
                )
                damaged.append(step)
                continue
            self._set_aside(damaged)
            return restored
        if damaged:
            self._set_aside(damaged)
            raise CheckpointNotFoundError(
                f"Every checkpoint in {self._latest.directory} is damaged (steps {damaged}, moved aside to"
                " damaged-<step>); start a new run, or pass another --workdir."
            )
        return None

    def _restore_step(self, step: int, abstract_state: PyTree, data_iter: Any | None) -> Restored:
        manager = self._latest
        step_dir = manager.directory / str(step)
        items: dict[str, Any] = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            iter_dir = step_dir / DATA_ITER_ITEM
            if not iter_dir.exists():
                log.warning(
                    "Checkpoint %s holds no data-iterator state; the data pipeline starts afresh.",
                    step_dir,
                )
            else:
                mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
                others = [p.name for p in iter_dir.iterdir() if p.name.startswith("process_")]
                if not (iter_dir / mine).exists() and others:
                    if all(not n.endswith(f"-of-{jax.process_count()}.json") for n in others):
                        raise CheckpointMismatchError(
                            f"Cannot restore the data-iterator state of {step_dir} with {jax.process_count()}"
                            f" processes: it was saved by another process count ({sorted(others)}). Resume"
                            " with the same number of processes."
                        )
                    raise FileNotFoundError(f"{iter_dir / mine} is missing")
                items[DATA_ITER_ITEM] = grain_checkpoint.CheckpointRestore(data_iter)
        items[META_ITEM] = ocp.args.JsonRestore()
        _check_params_fit(step_dir / STATE_ITEM, abstract_state)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:
            text = str(e)
            # What orbax says when the stored tree is intact but of another shape or structure (a damaged
            # file gives read errors instead, or a "pytree structure error" for a missing one).
            mismatch = (
                "not compatible with the stored shape",
                "Requested shape",
                "tree structures do not match",
            )
            if any(k in text for k in mismatch):
                raise CheckpointMismatchError(
                    f"{step_dir} holds a train state of another shape or structure than this config builds"
                    f" ({_cause(e)}): the model or optimizer config differs from the run's. Use the run's"
                    " config, or pass another --workdir to start a new run."
                ) from e
            raise
        meta = dict(restored[META_ITEM] or {})
        saved_hash = meta.get("config_hash")
        if self.config_hash and saved_hash and saved_hash != self.config_hash:
            log.info(
                "Restoring %s saved with config hash %s (now %s).", step_dir, saved_hash, self.config_hash
            )
        return Restored(step, restored[STATE_ITEM], meta)

    def _set_aside(self, steps: list[int]) -> None:
        """Move damaged step directories out of the manager's view (kept for inspection)."""
        if not steps:
            return
        if jax.process_index() == 0:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            for step in steps:
                src = self._latest.directory / str(step)
                if src.exists():
                    src.rename(self._latest.directory / f"damaged-{step}-{stamp}")
        multihost_sync("checkpoint-set-aside")
        self._latest.reload()

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


class InferenceVariables(NamedTuple):
    """What eval / predict restore: the variables (host numpy), and which checkpoint they came from."""

    params: PyTree
    model_state: PyTree  # non-param collections (e.g. batch_stats); {} for instance-norm models
    step: int | None  # None for converted weights
    directory: str


def checkpoint_candidates(
    path: str | os.PathLike[str], prefer: str = "best"
) -> list[tuple[epath.Path, bool]]:
    """The orbax pytree directories that may hold params under ``path``, in the order to try them.

    ``path`` may be a workdir (``checkpoints/<prefer>`` newest step first, then the other manager), a
    ``checkpoints/latest`` or ``checkpoints/best`` manager directory (newest step first), one step
    directory, or a ``python -m cinjax.convert`` output directory (``DIR/params``). Entries are
    ``(pytree_dir, is_state_tree)``; a state tree holds the params under ``"params"``.
    """
    if prefer not in (BEST_DIR, LATEST_DIR):
        raise ValueError(f"prefer must be 'best' or 'latest', got {prefer!r}.")
    root = epath.Path(os.fspath(path))
    if not root.exists():
        raise CheckpointNotFoundError(f"Checkpoint path {os.fspath(path)!r} does not exist.")
    if (root / CONVERTED_PARAMS).is_dir():
        return [(root / CONVERTED_PARAMS, False)]
    if _is_step_dir(root):
        return [(root / STATE_ITEM, True)]
    managers = [root]
    if (root / CHECKPOINTS).is_dir():
        managers = [
            root / CHECKPOINTS / name for name in (prefer, LATEST_DIR if prefer == BEST_DIR else BEST_DIR)
        ]
    out = []
    for manager_dir in managers:
        if manager_dir.is_dir():
            steps = sorted((int(p.name) for p in manager_dir.iterdir() if _is_step_dir(p)), reverse=True)
            out += [(manager_dir / str(step) / STATE_ITEM, True) for step in steps]
    if not out:
        raise CheckpointNotFoundError(
            f"No checkpoint found under {os.fspath(path)!r}. Expected a workdir with"
            " checkpoints/{best,latest}/<step>/, a checkpoint step directory, or a"
            " `python -m cinjax.convert` output directory containing params/."
        )
    return out


def restore_inference_variables(path: str | os.PathLike[str], *, prefer: str = "best") -> InferenceVariables:
    """The params and model state of a checkpoint (see :func:`checkpoint_candidates`) as host numpy
    arrays, independent of the topology they were saved on; the optimizer state is never read.

    A damaged checkpoint is skipped with a warning naming it, and the next candidate is used; using
    ``latest`` when ``best`` was asked for (a run without a best checkpoint yet) is logged.
    """
    candidates = checkpoint_candidates(path, prefer)
    for tree_dir, is_state_tree in candidates:
        try:
            params, model_state = _restore_variables(tree_dir, is_state_tree)
        except CheckpointNotFoundError:
            raise
        except Exception as e:  # a damaged step: try the next one
            log.warning("Checkpoint %s is damaged and is skipped: %s", tree_dir.parent, _cause(e))
            continue
        step = int(tree_dir.parent.name) if is_state_tree else None
        manager = tree_dir.parent.parent.name if is_state_tree else None
        if manager in (BEST_DIR, LATEST_DIR) and manager != prefer:
            log.warning("No %s checkpoint in %s: using %s step %s.", prefer, path, manager, step)
        return InferenceVariables(params, model_state, step, os.fspath(tree_dir.parent))
    tried = [os.fspath(d.parent) for d, _ in candidates]
    raise CheckpointNotFoundError(f"Every checkpoint under {os.fspath(path)!r} is damaged: {tried}.")


def _restore_variables(tree_dir: epath.Path, is_state_tree: bool) -> tuple[PyTree, PyTree]:
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
    params = {k: v for k, v in restored["params"].items() if k != INFO_NCE_HEAD}  # training only
    return params, restored.get("model_state", {})
