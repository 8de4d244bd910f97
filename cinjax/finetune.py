"""Starting a training run from another run's weights: fine-tuning, and adding a modality to a trained
conditional model through new rows of its CIN tables.

``config.finetune``:

* ``init_from``: a run directory (a training workdir, a checkpoint inside one, or a
  ``python -m cinjax.convert`` directory) whose weights start this run. Only a fresh start reads it: a
  workdir that already holds a checkpoint resumes from that checkpoint. The optimizer state and the
  schedule start anew.
* ``checkpoint``: ``best`` (falls back to ``latest``) or ``latest`` of ``init_from``.
* ``new_modality_init``: how the CIN row of a modality the source run did not have starts: ``mean`` (the
  mean of the source rows) or the name of a source modality whose row is copied. Modalities the source
  has keep their rows, matched by *name* (ids may differ between the runs).
* ``trainable``: ``all``; ``new_modalities`` (only the new rows of every CIN table change);
  ``new_modalities+head`` (also the output head). A frozen parameter is bit-identical after any number
  of steps: its gradient is zeroed before the optimizer (so clipping and the moments see only what
  trains) and its update after it (so weight decay does not move it).

CIN tables are found structurally: the parameters whose leading axis grows when the model is built
for one more modality (``scale[M, C]`` and ``bias[M, C]`` of every conditional norm).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from cinjax import checkpointing, runspec
from cinjax.config import ConfigError
from cinjax.models.layers.norms import CIN_PARAMS, cin_layers

TRAINABLE = ("all", "new_modalities", "new_modalities+head")
HEAD = "out"  # the output head's top-level module in every net (cinjax.models)


class FinetuneError(ConfigError):
    """A ``config.finetune`` setting that does not fit the source run; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Source:
    """The weights a run starts from, already laid out for this run's model."""

    params: Any
    model_state: Any
    directory: str
    step: int | None
    new_modalities: tuple[str, ...]  # this run's modalities the source did not have


def _path(keys: tuple) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def _flat(tree: Any) -> dict[str, Any]:
    return {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(flax.core.unfreeze(tree))[0]}


def _cin_table_paths(abstract_params: Any, num_modalities: int) -> set[str]:
    """Paths (``a/b/scale``, ``a/b/bias``) of the parameters with one row per modality: the tables of
    :func:`cinjax.models.layers.norms.cin_layers`."""
    return {f"{layer}/{q}" for layer in cin_layers(abstract_params, num_modalities) for q in CIN_PARAMS}


def _num_modalities(config: ml_collections.ConfigDict) -> int:
    return int(config.model.get("num_modalities", len(config.data.modalities)))


def load_source(config: ml_collections.ConfigDict, abstract_params: Any) -> Source:
    """The weights of ``finetune.init_from`` mapped onto this run's model (``abstract_params``: its
    shapes): CIN rows matched by modality name, new rows initialised by ``new_modality_init``, every
    other parameter copied (its shape must match)."""
    fc = config.finetune
    spec = runspec.read(fc.init_from)
    check_preprocessing(config, spec)
    variables = checkpointing.restore_inference_variables(fc.init_from, prefer=fc.checkpoint)
    src_rows = dict(spec.modalities)  # name -> row in the source tables
    new_ids = dict(config.data.modalities)
    new = tuple(n for n in new_ids if n not in src_rows)
    init = fc.new_modality_init
    if new and init != "mean" and init not in src_rows:
        raise FinetuneError(
            f"config.finetune.new_modality_init={init!r} is not a modality of {fc.init_from} "
            f"({sorted(src_rows)}); use 'mean' or one of those."
        )
    tables = _cin_table_paths(abstract_params, _num_modalities(config))
    target = _flat(abstract_params)
    source = _flat(variables.params)
    missing = sorted(set(target) - set(source))
    extra = sorted(set(source) - set(target))
    if missing or extra:
        raise FinetuneError(
            f"{variables.directory} does not hold this model's parameters (missing {missing[:5]}, "
            f"unexpected {extra[:5]}): config.model must be the architecture of {fc.init_from}."
        )
    out, bad = {}, []
    for key, abstract in target.items():
        value = np.asarray(source[key])
        if key in tables:
            if value.shape[1:] != abstract.shape[1:] or value.shape[0] != len(src_rows):
                bad.append(f"{key}: {value.shape} vs {abstract.shape}")
                continue
            fill = value.mean(axis=0) if init == "mean" else value[src_rows.get(init, 0)]
            rows = np.empty(abstract.shape, value.dtype)
            for name, row in new_ids.items():
                rows[row] = value[src_rows[name]] if name in src_rows else fill
            value = rows
        elif value.shape != abstract.shape:
            bad.append(f"{key}: {value.shape} vs {abstract.shape}")
            continue
        out[key] = value.astype(abstract.dtype)
    if bad:
        raise FinetuneError(
            f"Parameters of {variables.directory} do not fit config.model: {'; '.join(bad[:5])}. Only "
            "the number of modalities may differ from the source run."
        )
    params = _unflatten(abstract_params, out)
    return Source(params, variables.model_state, variables.directory, variables.step, new)


def check_preprocessing(config: ml_collections.ConfigDict, source: runspec.InferenceSpec) -> None:
    """The source run's voxel spacing, label codes and the intensity scaling of every modality both runs
    share must be this run's: a model fed differently prepared volumes than it was trained on is silently
    worse. A mismatch is an error when parameters stay frozen, a warning under ``trainable=all``."""
    mine = runspec.InferenceSpec.from_config(config)
    diffs = []
    if mine.spacing != source.spacing:
        diffs.append(f"data.spacing={mine.spacing} (source: {source.spacing})")
    if mine.label_codes != source.label_codes:
        diffs.append(f"data.label_codes={mine.label_codes} (source: {source.label_codes})")
    for name in sorted(set(mine.intensity) & set(source.intensity)):
        if mine.intensity[name] != source.intensity[name]:
            diffs.append(f"{name} intensity {mine.intensity[name]} (source: {source.intensity[name]})")
    if not diffs:
        return
    text = (
        f"config.finetune.init_from={config.finetune.init_from!r} was trained on other preprocessing: "
        f"{'; '.join(diffs)}. Set config.data to the source run's preprocessing (its inference.json)"
    )
    if config.finetune.trainable != "all":
        raise FinetuneError(text + ".")
    logging.warning("%s, unless retraining every parameter on the new preprocessing is intended.", text)


def _unflatten(like: Any, flat: dict[str, Any]) -> Any:
    paths, treedef = jax.tree_util.tree_flatten_with_path(flax.core.unfreeze(like))
    return jax.tree_util.tree_unflatten(treedef, [flat[_path(p)] for p, _ in paths])


def trainable_mask(config: ml_collections.ConfigDict, abstract_params: Any) -> Any | None:
    """The per-parameter update mask of ``finetune.trainable`` (None: everything trains).

    Leaves are numpy bools broadcastable to their parameter: ``(M, 1, ...)`` row masks for CIN tables,
    a scalar elsewhere. The new modalities are those of ``data.modalities`` missing from the source run.
    """
    fc = config.finetune
    if fc.trainable == "all":
        return None
    if not fc.init_from:
        raise FinetuneError(
            f"config.finetune.trainable={fc.trainable!r} freezes a trained model: set finetune.init_from "
            "to the run whose weights to start from."
        )
    old = set(runspec.read(fc.init_from).modalities)
    new_rows = [row for name, row in config.data.modalities.items() if name not in old]
    if not new_rows:
        raise FinetuneError(
            f"config.finetune.trainable={fc.trainable!r}, but every modality of data.modalities "
            f"({sorted(config.data.modalities)}) is already in {fc.init_from}: add the new modality to "
            "data.modalities (with its datalist), or use finetune.trainable='all'."
        )
    tables = _cin_table_paths(abstract_params, _num_modalities(config))
    head = fc.trainable == "new_modalities+head"
    masks = {}
    for key, abstract in _flat(abstract_params).items():
        if key in tables:
            rows = np.zeros((abstract.shape[0],) + (1,) * (len(abstract.shape) - 1), bool)
            rows[new_rows] = True
            masks[key] = rows
        else:
            masks[key] = np.asarray(head and key.split("/")[0] == HEAD)
    return _unflatten(abstract_params, masks)


def masked(tx: optax.GradientTransformation, mask: Any | None) -> optax.GradientTransformation:
    """``tx`` updating only where ``mask`` is True (gradients zeroed before it, updates after it)."""
    if mask is None:
        return tx

    def zero(tree: Any) -> Any:
        return jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), tree, mask)

    def init_fn(params: Any) -> Any:
        return tx.init(params)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        updates, state = tx.update(zero(updates), state, params)
        return zero(updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def validate(config: ml_collections.ConfigDict) -> None:
    """Start-up checks of ``config.finetune`` that need no weights (raises ``FinetuneError``)."""
    fc = config.finetune
    if fc.trainable not in TRAINABLE:
        raise FinetuneError(f"config.finetune.trainable must be one of {TRAINABLE}, got {fc.trainable!r}.")
    if fc.checkpoint not in (checkpointing.BEST_DIR, checkpointing.LATEST_DIR):
        raise FinetuneError(f"config.finetune.checkpoint must be 'best' or 'latest', got {fc.checkpoint!r}.")
    if fc.init_from and not os.path.exists(fc.init_from):
        raise FinetuneError(
            f"config.finetune.init_from={fc.init_from!r} does not exist: give a trained run directory."
        )
    if fc.trainable != "all" and not fc.init_from:
        raise FinetuneError(
            f"config.finetune.trainable={fc.trainable!r} needs finetune.init_from (the trained run)."
        )
