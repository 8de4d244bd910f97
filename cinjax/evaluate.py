"""Whole-volume evaluation: sliding-window inference, metrics per modality and class, ``results.json``.

:func:`evaluate` scores a predict function on cached volumes (periodic evaluation during training and
``mode=eval``); :func:`evaluate_checkpoint` is ``mode=eval``: a saved checkpoint on ``eval.split``.
``python -m cinjax.evaluate --pred DIR --gt DIR`` (:func:`score_folder`) scores any folder of NIfTI
predictions against same-named ground truths with the same metrics (``--help`` lists the options).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from jax.sharding import Mesh

from cinjax import (
    build,
    checkpointing,
    distributed,
    inference,
    losses,
    metrics,
    postprocess,
    runspec,
    writers,
)
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
    postprocessing: bool = False,
) -> dict[str, Any]:
    """Sliding-window inference on every record, metrics per volume, summary (results.json shape).

    With ``loss_fn`` the training loss of each whole-volume prediction is reported too (``loss``: the
    mean over volumes; what MI-Seg's reduce-on-plateau monitors). ``panels_dir`` gets one PNG panel per
    modality. ``postprocessing``: also decide, per modality and class, whether keeping only the largest
    connected component raises the mean Dice (:func:`cinjax.postprocess.decide`; ``"postprocessing"``).

    Every process evaluates every volume on its local devices (only process 0 writes), so no
    cross-host gather of Python objects is needed.
    """
    names = dataset.modality_names
    foreground = tuple(dataset.class_names)[1:]
    volumes, panels, candidates = [], {}, []
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
        if postprocessing:
            cands = postprocess.candidate_dice(pred.labels, label, dataset.num_classes)
            candidates.append((names[rec.modality], cands))
        panels.setdefault(names[rec.modality], (image, label, pred.labels))
    summary = metrics.summarize(volumes, foreground, dataset.union_name)
    if loss_fn is not None and volumes:
        summary["loss"] = float(np.mean([v["loss"] for v in volumes]))
    if postprocessing:
        summary["postprocessing"] = postprocess.decide(candidates, dataset.class_names)
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
    """``mode=eval``: evaluate a saved checkpoint (``eval.checkpoint``) on ``eval.split`` of the
    configured datalists, with the model and preprocessing of the run it belongs to.

    Writes ``eval/<split>_<checkpoint>_step<N>/`` (``results.json``, ``config.json``, panels), and
    ``eval/results.json`` only in a workdir that has none: a training run's records (``config.json``,
    ``metrics.jsonl``, ``eval/results.json``) are never rewritten.
    """
    ev = config.eval
    run = Workdir(workdir)
    run.check(int(config.train.min_free_gb * (1 << 30)))
    build.generate_phantom(config.data)
    source = run.root if ev.checkpoint in ("best", "latest") else ev.checkpoint
    prefer = ev.checkpoint if ev.checkpoint in ("best", "latest") else "best"
    spec = runspec.read(source)
    data = runspec.data_for(spec, config.data)
    prepared = build.prepare_data(data, (ev.split,))
    variables = checkpointing.restore_inference_variables(source, prefer=prefer)
    model = build.model_from_spec(spec, ev.dtype or None)
    window = inference.WindowSettings(
        roi=spec.roi,
        windows_per_call=build.check_windows_per_call(ev.windows_per_call),
        stitch_on_host=ev.stitch_on_host,
        **spec.window,
    )
    mesh = build.inference_mesh(window.windows_per_call)
    tag = f"{ev.split}_{prefer if source == run.root else 'checkpoint'}_step{variables.step}"
    out_dir = run.eval_dir(tag)
    results = evaluate(
        build.WindowPredictor(model, mesh).bind(variables.params, variables.model_state),
        eval_records(config, prepared),
        dataset=prepared,
        window=window,
        mesh=mesh,
        distances=ev.distances,
        panels_dir=os.path.join(out_dir, "panels") if ev.panels else None,
    )
    results = dict(results, split=ev.split, step=variables.step, checkpoint=variables.directory)
    path = run.write_results(results, os.path.join(out_dir, "results.json"))
    run.save_config(config, os.path.join(out_dir, "config.json"))
    if not os.path.exists(run.results_path):
        run.write_results(results)
    logging.info("Mean Dice %.4f; results in %s.", results["mean_dice"], path)
    return results


# ------------------------------------------------------------------ scoring a folder of predictions
# ``python -m cinjax.evaluate --pred DIR --gt DIR``: NIfTI predictions (cinjax's or any other tool's)
# against ground truths, through the same metrics.evaluate_volume / metrics.summarize as evaluate().
# Its imports live here (``os``, ``Sequence``, ``Any``, ``np``, ``tqdm``, ``metrics`` come from the top).

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterable, Mapping  # noqa: E402

from cinjax.data import datalist as datalist_lib  # noqa: E402
from cinjax.data import mmwhs  # noqa: E402
from cinjax.data.io import DataError, Geometry, load_label, map_label_codes  # noqa: E402

LABEL_CODE_CHOICES = ("mmwhs", "identity")
AFFINE_ATOL_MM = 1e-3  # prediction and ground truth must share a voxel grid within this (as check_pair)
_NIFTI_EXTS = (".nii.gz", ".nii")
# Default modality names (MI-Seg datalists: 0 = CT, 1 = MR); a file named ``<name lower-cased>_...``
# (MM-WHS: ct_train_1001_label.nii.gz) belongs to that modality.
DEFAULT_MODALITIES = dict(mmwhs.MODALITIES)
ALL_GROUP = "all"  # the modality of files whose names and datalists tell none


def _stem(name: str) -> str | None:
    """File name without ``.nii`` / ``.nii.gz``; None for a name that is not NIfTI."""
    for ext in _NIFTI_EXTS:
        if name.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return None


def _nifti_files(folder: str, what: str) -> dict[str, str]:
    """``{stem: path}`` of the NIfTI files directly in ``folder`` (sorted by name).

    A missing folder, one without NIfTI files, or two files with one stem (``a.nii`` and ``a.nii.gz``:
    which one to score would be a guess) is a :class:`DataError`.
    """
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: the {what} folder does not exist or is not a directory.")
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise DataError(f"{folder}: cannot list the {what} folder ({e.strerror}).") from None
    files: dict[str, str] = {}
    for name in names:
        stem = _stem(name)
        if stem is None or name.startswith("."):
            continue
        if stem in files:
            raise DataError(
                f"{folder}: {os.path.basename(files[stem])} and {name} have the same name; keep one of them."
            )
        files[stem] = os.path.join(folder, name)
    if not files:
        raise DataError(f"{folder}: no .nii / .nii.gz files in the {what} folder.")
    return files


def _match(
    preds: Mapping[str, str], gts: Mapping[str, str]
) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """Pairs ``(key, prediction path, ground-truth path)`` matched by name, and the file names left over.

    A prediction matches the ground truth of the same name; failing that, the one named with ``image`` →
    ``label`` (a prediction named after its image). Ground-truth-folder files ``…image…`` that have a
    ``…label…`` sibling are the images of image/label pairs (MM-WHS ``ct_train/``), not ground truths.
    """
    gts = {s: p for s, p in gts.items() if not ("image" in s and s.replace("image", "label") in gts)}
    taken: dict[str, str] = {s: s for s in preds if s in gts}
    for s in preds:
        alias = s.replace("image", "label")
        if s not in taken and alias in gts and alias not in taken.values():
            taken[s] = alias
    pairs = sorted((taken[s], preds[s], gts[taken[s]]) for s in taken)
    lone_preds = [os.path.basename(preds[s]) for s in preds if s not in taken]
    matched = set(taken.values())
    lone_gts = [os.path.basename(p) for s, p in gts.items() if s not in matched]
    return pairs, lone_preds, lone_gts


def _modality_name(value: Any, where: str, modalities: Mapping[str, int] = DEFAULT_MODALITIES) -> str:
    """A datalist modality (id, name, or Decathlon ``{"0": "CT"}``) -> a group name (ids named by
    ``modalities``)."""
    if isinstance(value, Mapping):
        if len(value) != 1:
            raise DataError(f"{where}: modality {dict(value)} has {len(value)} channels; expected one.")
        value = next(iter(value.values()))
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip():
        raise DataError(f"{where}: modality {value!r} is not an id or a name (e.g. 0, 1, 'CT', 'MR').")
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        by_id = {v: k for k, v in modalities.items()}
        return by_id.get(int(text), f"modality_{int(text)}")
    known = {name.upper(): name for name in modalities}
    return known.get(text.upper(), text)


def _datalist_modalities(
    paths: Iterable[str], modalities: Mapping[str, int] = DEFAULT_MODALITIES
) -> dict[str, str]:
    """``{label stem: modality}`` from MI-Seg / Decathlon datalists.

    Each entry names its label (basename) or its image (basename with ``image`` → ``label``, the name
    cinjax gives the image's prediction); the modality is the entry's ``modality`` or the file's
    top-level one. A name listed under two modalities is an error naming both places.
    """
    found: dict[str, tuple[str, str]] = {}
    for path in paths:
        try:
            with open(path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            raise DataError(f"{path}: datalist file does not exist.") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the datalist as JSON ({e}).") from None
        if not isinstance(doc, Mapping) or not any(s in doc for s in datalist_lib.SPLITS):
            raise DataError(
                f"{path}: a datalist is a JSON object with 'training' / 'validation' / 'test' lists."
            )
        for split in datalist_lib.SPLITS:
            items = doc.get(split) or []
            if not isinstance(items, list):
                raise DataError(f"{path}: '{split}' must be a list, got {type(items).__name__}.")
            for i, raw in enumerate(items):
                where = f"{path} [{split}][{i}]"
                entry = {"image": raw} if isinstance(raw, str) else raw
                if not isinstance(entry, Mapping):
                    raise DataError(f"{where}: entry {raw!r} is neither a path nor an object.")
                names = []
                for field, rename in (("label", False), ("image", True)):
                    if isinstance(entry.get(field), str):
                        base = os.path.basename(entry[field])
                        stem = _stem(base) or base
                        names.append(stem.replace("image", "label") if rename else stem)
                if not names:
                    continue
                modality = entry.get("modality", doc.get("modality"))
                if modality is None:
                    raise DataError(f"{where}: no modality: give a top-level 'modality' or one per entry.")
                name = _modality_name(modality, where, modalities)
                for stem in names:
                    if stem in found and found[stem][0] != name:
                        raise DataError(
                            f"{where}: {stem} is {name} here but {found[stem][0]} in {found[stem][1]}."
                        )
                    found[stem] = (name, where)
    return {stem: name for stem, (name, _) in found.items()}


def _modality_of(
    names: Iterable[str], listed: Mapping[str, str], modalities: Mapping[str, int] = DEFAULT_MODALITIES
) -> str:
    """The group of a file from its names (ground truth's, then prediction's): datalist, else the
    name prefix ``<modality>_`` (longest modality name first: ``mr2_`` before ``mr_``), else
    :data:`ALL_GROUP`."""
    names = list(names)
    for name in names:
        if name in listed:
            return listed[name]
    prefixes = sorted(((m.lower() + "_", m) for m in modalities), key=lambda p: -len(p[0]))
    for name in names:
        for prefix, modality in prefixes:
            if name.lower().startswith(prefix):
                return modality
    return ALL_GROUP


def _num_classes_of(gt_paths: Sequence[str]) -> int:
    """1 + the largest ground-truth value (identity codes); MM-WHS codes or no foreground are errors."""
    values: set[int] = set()
    for path in tqdm.tqdm(gt_paths, desc="classes", unit="vol", leave=False, disable=_quiet(gt_paths)):
        label = load_label(path)[0]
        lo, hi = int(label.min()), int(label.max())
        if lo < 0:
            raise DataError(f"{path}: ground truth has negative values ({lo}); class ids are 0, 1, ...")
        if hi < (1 << 20):
            values.update(np.flatnonzero(np.bincount(label.reshape(-1))).tolist())
        else:
            values.update(np.unique(label).tolist())
    foreground = values - {0}
    if not foreground:
        raise DataError("the ground truths have no foreground voxels; give --num-classes.")
    if foreground <= set(mmwhs.CODES):
        raise DataError(
            f"the ground-truth values {sorted(foreground)} are MM-WHS label codes, not class ids; use "
            "--label-codes mmwhs (or give --num-classes to score them as class ids anyway)."
        )
    return 1 + max(foreground)


def _label_setup(
    label_codes: str, num_classes: int | None, class_names: Iterable[str] | None, gt_paths: Iterable[str]
) -> tuple[dict[int, int] | None, int, tuple[str, ...], str]:
    """``(code map or None for identity, num classes, foreground names, union name)``.

    Identity codes without ``num_classes`` (or names) take 1 + the largest ground-truth value, which
    needs a first pass over the ground truths.
    """
    names = None if class_names is None else tuple(str(n).strip() for n in class_names)
    if label_codes == "mmwhs":
        if num_classes not in (None, mmwhs.NUM_CLASSES):
            raise DataError(
                f"--num-classes {num_classes} does not fit --label-codes mmwhs "
                f"({mmwhs.NUM_CLASSES} classes: background + 7 substructures)."
            )
        num_classes, union = mmwhs.NUM_CLASSES, mmwhs.UNION_NAME
        names = names or tuple(mmwhs.CLASS_NAMES[1:])
        codes: dict[int, int] | None = datalist_lib.label_code_map("mmwhs", num_classes)
    elif label_codes == "identity":
        union, codes = "whole_foreground", None
        if num_classes is None and names:
            num_classes = len(names) + 1
        if num_classes is None:
            num_classes = _num_classes_of(list(gt_paths))
        names = names or tuple(f"class_{c}" for c in range(1, num_classes))
    else:
        raise DataError(f"label codes {label_codes!r}: expected one of {', '.join(LABEL_CODE_CHOICES)}.")
    if num_classes < 2:
        raise DataError(f"--num-classes {num_classes}: need at least 2 (background and one class).")
    if len(names) != num_classes - 1:
        raise DataError(
            f"--class-names has {len(names)} names but {num_classes} classes need {num_classes - 1} "
            "(one per foreground class; background 0 is unnamed)."
        )
    if len(set(names)) != len(names) or not all(names):
        raise DataError(f"--class-names {','.join(names)}: names must be non-empty and distinct.")
    return codes, num_classes, names, union


def _class_ids(
    array: np.ndarray, path: str, what: str, codes: Mapping[int, int] | None, num_classes: int
) -> np.ndarray:
    """A label map's file codes -> class ids ``0..num_classes-1``; other values are an error naming the
    file."""
    lo, hi = int(array.min()), int(array.max())
    if codes is not None:
        try:
            return map_label_codes(array, codes, path)
        except DataError as e:
            hint = " If the files hold class ids, use --label-codes identity." if lo >= 0 and hi < 256 else ""
            raise DataError(f"{e} ({what}){hint}") from None
    if lo < 0 or hi >= num_classes:
        raise DataError(
            f"{path}: {what} values lie in [{lo}, {hi}], outside the classes 0..{num_classes - 1}; give "
            "--num-classes (default: 1 + the largest ground-truth value), or --label-codes mmwhs for "
            "MM-WHS codes."
        )
    return array


def _check_grid(pred_path: str, pred: Geometry, gt_path: str, gt: Geometry) -> None:
    """A prediction must lie on its ground truth's voxel grid: same shape, affines within 1e-3 mm."""
    if pred.shape != gt.shape:
        raise DataError(
            f"{pred_path}: prediction shape {pred.shape} differs from shape {gt.shape} of the ground truth "
            f"{gt_path}; write predictions on the ground truth's voxel grid (same shape and affine), e.g. "
            "resample the prediction to the ground truth."
        )
    diff = float(np.max(np.abs(pred.affine - gt.affine)))
    if diff > AFFINE_ATOL_MM:
        raise DataError(
            f"{pred_path}: prediction affine differs from that of the ground truth {gt_path} by up to "
            f"{diff:.3g} mm (tolerance {AFFINE_ATOL_MM:g}); write predictions on the ground truth's "
            "voxel grid (same shape and affine), e.g. resample the prediction to the ground truth."
        )


def score_folder(
    pred_dir: str,
    gt_dir: str,
    *,
    label_codes: str = "mmwhs",
    num_classes: int | None = None,
    class_names: Iterable[str] | None = None,
    datalists: Iterable[str] = (),
    distances: bool = True,
    modalities: Mapping[str, int] = DEFAULT_MODALITIES,
) -> dict[str, Any]:
    """Score every prediction in ``pred_dir`` against the same-named ground truth in ``gt_dir``.

    Returns :func:`metrics.summarize`'s results.json shape (so the numbers equal training-time
    evaluation) plus ``pred_dir``, ``gt_dir`` and ``unmatched`` (``{"predictions": [...],
    "ground_truths": [...]}``: file names without a partner). Groups (``modalities``) come from
    ``datalists`` (ids named by ``modalities``), else the ``<modality>_`` name prefix (``ct_`` / ``mr_``
    by default), else one group ``"all"``; distances are in
    mm from the ground truth's affine. Problems a user can cause (a bad folder, no match, a prediction
    off the ground truth's grid, an unknown label code) raise :class:`DataError` naming the files.
    """
    preds = _nifti_files(pred_dir, "prediction")
    gts = _nifti_files(gt_dir, "ground-truth")
    pairs, lone_preds, lone_gts = _match(preds, gts)
    if not pairs:
        pred_eg, gt_eg = (os.path.basename(next(iter(d.values()))) for d in (preds, gts))
        raise DataError(
            f"no prediction in {pred_dir} ({len(preds)} files, e.g. {pred_eg}) has the name of a ground "
            f"truth in {gt_dir} ({len(gts)} files, e.g. {gt_eg}); predictions are matched to ground "
            "truths by file name (without .nii / .nii.gz)."
        )
    listed = _datalist_modalities(datalists, modalities)
    codes, num_classes, foreground, union = _label_setup(
        label_codes, num_classes, class_names, [gt for _, _, gt in pairs]
    )
    pred_stems = {path: stem for stem, path in preds.items()}
    volumes = []
    bar = tqdm.tqdm(pairs, desc="score", unit="vol", leave=False, disable=_quiet(pairs))
    for key, pred_path, gt_path in bar:
        gt, gt_geom = load_label(gt_path)
        pred, pred_geom = load_label(pred_path)
        _check_grid(pred_path, pred_geom, gt_path, gt_geom)
        volumes.append(
            metrics.evaluate_volume(
                _class_ids(pred, pred_path, "prediction", codes, num_classes),
                _class_ids(gt, gt_path, "ground truth", codes, num_classes),
                spacing=gt_geom.spacing,
                num_classes=num_classes,
                class_names=foreground,
                key=key,
                modality_name=_modality_of((key, pred_stems[pred_path]), listed, modalities),
                union_name=union,
                distances=distances,
            )
        )
    results = metrics.summarize(volumes, foreground, union)
    results["pred_dir"] = os.path.abspath(pred_dir)
    results["gt_dir"] = os.path.abspath(gt_dir)
    results["unmatched"] = {"predictions": lone_preds, "ground_truths": lone_gts}
    return results


def _quiet(items: Sequence[Any]) -> bool | None:
    """tqdm's ``disable``: no bar for a single file, else one on a terminal only."""
    return True if len(items) < 2 else None


def _cell(value: Any, n_inf: int = 0) -> str:
    """A table number: 4 decimals, ``n/a`` for NaN / missing, and the infinite volumes a distance mean
    left out."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = "n/a"
    else:
        text = "inf" if math.isinf(value) else f"{value:.4f}"
    return f"{text} ({n_inf} inf)" if n_inf else text


def _union_key(modality: Mapping[str, Any]) -> str:
    return next(k for k in modality if k.endswith("_dice") and k != "mean_dice")


def format_table(results: Mapping[str, Any]) -> str:
    """A Markdown table of ``results`` (:func:`score_folder` / :func:`evaluate`): a row per foreground
    class, the mean over classes and the union Dice; Dice / HD95 mm / ASSD mm columns per modality.

    ``(k inf)`` after a distance counts the volumes it is infinite in (a class in only one of the two
    masks), which the mean leaves out.
    """
    mods = dict(results["modalities"])
    if not mods:
        return "(no volumes)"
    first = next(iter(mods.values()))
    classes = list(first["classes"])
    union_key = _union_key(first)
    dist = any(k in c for m in mods.values() for c in m["classes"].values() for k in metrics.DISTANCE_KEYS)
    cols = (("dice", "Dice"),) + ((("hd95_mm", "HD95 mm"), ("assd_mm", "ASSD mm")) if dist else ())
    header = ["class"] + [f"{m} {title}" for m in mods for _, title in cols]
    rows = []
    for name in classes:
        row = [name]
        for m in mods.values():
            c = m["classes"].get(name, {})
            n_inf = {k: c.get(k.replace("_mm", "_n_inf"), 0) for k in metrics.DISTANCE_KEYS}
            row += [_cell(c.get(k, math.nan), n_inf.get(k, 0)) for k, _ in cols]
        rows.append(row)
    rows.append(["mean"] + [_cell(m.get(f"mean_{k}")) for m in mods.values() for k, _ in cols])
    union_row = [_cell(m.get(union_key)) if k == "dice" else "" for m in mods.values() for k, _ in cols]
    rows.append([union_key[: -len("_dice")], *union_row])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    dashes = ["-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)]
    rule = "|" + "|".join(dashes) + "|"
    counts = ", ".join(f"{m} {r.get('n_volumes', 0)}" for m, r in mods.items())
    footer = f"volumes: {counts}; mean Dice over all volumes {_cell(results.get('mean_dice'))}"
    return "\n".join([line(header), rule, *(line(r) for r in rows), "", footer])


def _write_json(results: Mapping[str, Any], path: str) -> None:
    """results.json as strict JSON (NaN as null, inf as "inf"), like :meth:`Workdir.write_results`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(metrics.json_safe(results), f, indent=1, allow_nan=False)


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def _write_csv(results: Mapping[str, Any], path: str) -> None:
    """One row per modality x class: modality, class, dice, hd95_mm, assd_mm, n_volumes (NaN empty)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["modality", "class", "dice", "hd95_mm", "assd_mm", "n_volumes"])
        for modality, r in results["modalities"].items():
            for name, c in r["classes"].items():
                values = [c.get(k) for k in ("dice", "hd95_mm", "assd_mm", "n_volumes")]
                writer.writerow([modality, name, *(_csv_value(v) for v in values)])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"need at least 2 classes (background and one), got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cinjax.evaluate",
        allow_abbrev=False,
        description="Score a folder of NIfTI label predictions against a folder of ground truths (files "
        "matched by name): Dice, HD95 and ASSD in mm per modality and class, with the metrics of "
        "training-time evaluation. Prints a Markdown table.",
    )
    p.add_argument("--pred", required=True, metavar="DIR", help="Folder of predicted label maps.")
    p.add_argument("--gt", required=True, metavar="DIR", help="Folder of ground-truth label maps.")
    p.add_argument(
        "--label-codes",
        choices=LABEL_CODE_CHOICES,
        default="mmwhs",
        help="mmwhs: MM-WHS codes (500, 600, ...) -> 7 classes (default); identity: values are class ids.",
    )
    p.add_argument("--out", metavar="FILE", help="Write the results as JSON (results.json shape).")
    p.add_argument("--csv", metavar="FILE", help="Write one row per modality x class as CSV.")
    p.add_argument(
        "--datalist",
        action="append",
        default=[],
        metavar="JSON",
        help="MI-Seg / Decathlon datalist giving the modality of each file (repeatable).",
    )
    p.add_argument(
        "--num-classes",
        type=_positive_int,
        metavar="N",
        help="Classes including background (identity codes; default 1 + the largest ground-truth value).",
    )
    p.add_argument(
        "--class-names",
        type=lambda s: [n.strip() for n in s.split(",")],
        metavar="A,B,...",
        help="Foreground class names (default class_1, class_2, ...; MM-WHS names for mmwhs codes).",
    )
    p.add_argument("--no-distances", action="store_true", help="Dice only (skips HD95 / ASSD: fast).")
    p.add_argument(
        "--modalities",
        type=_modality_map,
        default=DEFAULT_MODALITIES,
        metavar="NAME=ID,...",
        help="Modality names and ids of the datalists and file-name prefixes (default CT=0,MR=1).",
    )
    return p


def _modality_map(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"expected NAME=ID,... (e.g. CT=0,MR=1,MR2=2), got {text!r}")
        out[name.strip()] = int(value)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """The ``python -m cinjax.evaluate`` command: score, print the table, write ``--out`` / ``--csv``.

    Errors a user can cause end with one line ``cinjax.evaluate: error: ...`` and exit status 1.
    """
    args = _parser().parse_args(argv)
    try:
        results = score_folder(
            args.pred,
            args.gt,
            label_codes=args.label_codes,
            num_classes=args.num_classes,
            class_names=args.class_names,
            datalists=args.datalist,
            distances=not args.no_distances,
            modalities=args.modalities,
        )
        for what, names in (
            ("prediction(s) without ground truth", results["unmatched"]["predictions"]),
            ("ground truth(s) without prediction", results["unmatched"]["ground_truths"]),
        ):
            if names:
                print(f"cinjax.evaluate: warning: {len(names)} {what}: {', '.join(names)}", file=sys.stderr)
        print(format_table(results), flush=True)
        for path, write in ((args.out, _write_json), (args.csv, _write_csv)):
            if path:
                try:
                    write(results, path)
                except OSError as e:
                    raise DataError(f"{path}: cannot write ({e.strerror or e}).") from None
                print(f"wrote {path}")
    except DataError as e:
        print(f"cinjax.evaluate: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("cinjax.evaluate: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
