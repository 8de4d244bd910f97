"""Whole-volume evaluation: sliding-window inference, metrics per modality and class, ``results.json``.

:func:`evaluate` scores a predict function on cached volumes (periodic evaluation during training and
``mode=eval``); :func:`evaluate_checkpoint` is ``mode=eval``: a saved checkpoint on ``eval.split``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.sharding import Mesh

from cinjax import build, distributed, inference, losses, metrics, writers
from cinjax.data import cache
from cinjax.data.preprocess import PreparedData
from cinjax.workdir import Workdir


def _spacing_of(record: cache.VolumeRecord) -> tuple[float, ...]:
    return tuple(float(s) for s in cache.read_meta(record.path)["spacing"])


@functools.partial(jax.jit, static_argnums=0)
def _volume_loss(loss_fn: losses.LossFn, logits: jax.Array, label: jax.Array) -> jax.Array:
    out = loss_fn(logits[None], label[None].astype(jnp.int32))
    return out[0] if isinstance(out, tuple) else out


def evaluate(
    predict_fn: inference.PredictFn,
    records: Sequence[cache.VolumeRecord],
    *,
    dataset: PreparedData,
    window: inference.WindowSettings,
    mesh: Mesh | None = None,
    distances: bool = True,
    panels_dir: str | None = None,
    step: int = 0,
    loss_fn: losses.LossFn | None = None,
) -> dict[str, Any]:
    """Sliding-window inference on every record, metrics per volume, summary (results.json shape).

    With ``loss_fn`` the training loss of each whole-volume prediction is reported too (``loss``: the
    mean over volumes; what MI-Seg's reduce-on-plateau monitors). ``panels_dir`` gets one PNG panel per
    modality.

    Every process evaluates every volume on its local devices (only process 0 writes), so no
    cross-host gather of Python objects is needed.
    """
    names = dataset.modality_names
    foreground = tuple(dataset.class_names)[1:]
    volumes, panels = [], {}
    for rec in tqdm.tqdm(
        records, desc="evaluate", unit="vol", disable=not distributed.is_main_process(), leave=False
    ):
        if not rec.has_label:
            raise ValueError(f"{rec.key}: evaluation needs labelled volumes.")
        image, label = cache.read_volume(rec)
        pred = inference.predict_volume(
            predict_fn, image[..., None], rec.modality, window, num_classes=dataset.num_classes, mesh=mesh
        )
        volume = metrics.evaluate_volume(
            pred.labels,
            label,
            spacing=_spacing_of(rec),
            num_classes=dataset.num_classes,
            class_names=foreground,
            key=rec.key,
            modality_name=names[rec.modality],
            union_name=dataset.union_name,
            distances=distances,
        )
        if loss_fn is not None:
            volume["loss"] = float(_volume_loss(loss_fn, jnp.asarray(pred.logits), jnp.asarray(label)))
        volumes.append(volume)
        panels.setdefault(names[rec.modality], (image, label, pred.labels))
    summary = metrics.summarize(volumes, foreground, dataset.union_name)
    if loss_fn is not None and volumes:
        summary["loss"] = float(np.mean([v["loss"] for v in volumes]))
    if panels_dir:
        writers.save_modality_panels(panels_dir, step, panels, num_classes=dataset.num_classes)
    return summary


def scalars(results: dict[str, Any], union_name: str) -> dict[str, float]:
    """The headline numbers of ``results`` for ``metrics.jsonl`` / TensorBoard."""
    out = {"mean_dice": results["mean_dice"]}
    if "loss" in results:
        out["loss"] = results["loss"]
    for m, r in results["modalities"].items():
        out[f"{m}/mean_dice"] = r["mean_dice"]
        for k in ("mean_hd95_mm", "mean_assd_mm", f"{union_name}_dice"):
            if k in r:
                out[f"{m}/{k}"] = r[k]
    return out


def eval_records(config: ml_collections.ConfigDict, prepared: PreparedData) -> list[cache.VolumeRecord]:
    """The volumes of ``eval.split`` (the first ``eval.max_volumes`` when that is set)."""
    return prepared.all_records(config.eval.split)[: config.eval.max_volumes or None]


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """``mode=eval``: evaluate a saved checkpoint (``eval.checkpoint``) on ``eval.split``."""
    run = Workdir(workdir)
    run.check(int(config.train.min_free_gb * (1 << 30)))
    run.save_config(config)
    build.generate_phantom(config.data)
    prepared = build.prepare_data(config.data, (config.eval.split,))
    model, variables = build.restore_for_inference(config, config.eval.checkpoint, run.root)
    window = build.window_settings(config)
    mesh = build.inference_mesh(window.windows_per_call)
    results = evaluate(
        build.WindowPredictor(model, mesh).bind(variables.params, variables.model_state),
        eval_records(config, prepared),
        dataset=prepared,
        window=window,
        mesh=mesh,
        distances=config.eval.distances,
        panels_dir=run.panels_dir if config.eval.panels else None,
    )
    results = dict(results, split=config.eval.split, step=variables.step, checkpoint=variables.directory)
    run.write_results(results)
    with writers.MetricWriter(run.root) as writer:
        writer.write_scalars(0, scalars(results, prepared.union_name), stream="eval")
    return results
