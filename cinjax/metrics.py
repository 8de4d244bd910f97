"""Evaluation metrics on label maps: per-class Dice, HD95 and ASSD in millimetres, summaries.

Host-side numpy/scipy, one volume at a time, on integer label maps (prediction = argmax of the logits).
MONAI conventions (MI-Seg used MONAI's DiceMetric / SurfaceDistanceMetric, docs/mi-seg-spec.md §7.2):

* **Dice** ``2|P∩G| / (|P|+|G|)`` per class. With ``ignore_empty=True`` (MONAI's default, MI-Seg's
  setting) a class absent from the ground truth gives **NaN whatever the prediction** (so a false
  positive of an absent class is not penalised) and is skipped by the NaN-ignoring means. With
  ``ignore_empty=False``: GT and prediction both empty → 1.0; GT empty, prediction not → 0.0.
* **Surfaces** are boundary voxels: ``mask XOR binary_erosion(mask)`` with scipy's default 3-D *cross*
  (6-connectivity) structuring element and zeros outside the volume (MONAI ``get_mask_edges``), so
  voxels on the volume border are surface voxels.
* **Distances** are Euclidean in millimetres: ``scipy.ndimage.distance_transform_edt(~surface,
  sampling=spacing)`` evaluated at the other mask's surface voxels (the anisotropic voxel spacing in
  mm, in array-axis order). MI-Seg/MONAI 1.1 measured in voxels (= mm after 1 mm resampling).
* **HD95** (MONAI ``compute_hausdorff_distance(percentile=95)``): the 95th percentile (linear
  interpolation) of the prediction→GT distances and of the GT→prediction distances; the larger of the
  two. **ASSD** (MONAI ``compute_average_surface_distance(symmetric=True)``): the mean of both sets of
  distances pooled together.
* Empty masks: both empty → NaN; exactly one empty → ``inf`` for both HD95 and ASSD. (MONAI returns
  ``inf`` for ASSD and for the plain Hausdorff distance but NaN for its percentile variant, an artefact
  of ``torch.quantile`` on all-inf input; we return ``inf`` consistently.)
* **Union Dice** (``<union_name>_dice``; the whole-heart Dice for MM-WHS): every foreground class
  merged (``label > 0``), same empty convention.

:func:`summarize` aggregates per-volume results (from :func:`evaluate_volume`) into the results.json
shape. Dice means ignore NaN. Distance means are taken over the volumes where the distance is finite,
and ``n_inf`` counts the volumes where it is infinite (a class present in one mask but not the other);
MONAI's own mean would be ``inf`` as soon as ``n_inf > 0``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

DISTANCE_KEYS = ("hd95_mm", "assd_mm")


def _nanmean(values: Any) -> float:
    a = np.asarray(values, np.float64)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def _finite_mean(values: Any) -> float:
    a = np.asarray(values, np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


def _check_pair(pred: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}.")
    return pred, label


# --------------------------------------------------------------------------------------------- Dice


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` voxel counts, rows = ground-truth class, columns = predicted class."""
    pred, label = _check_pair(pred, label)
    for name, a in (("prediction", pred), ("label", label)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} values must lie in [0, {num_classes}), got [{a.min()}, {a.max()}].")
    index = label.reshape(-1).astype(np.intp) * num_classes
    index += pred.reshape(-1)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def dice_from_confusion(cm: np.ndarray, ignore_empty: bool = True) -> np.ndarray:
    """Per-class Dice (all K classes) from a confusion matrix, with the empty-GT convention above."""
    cm = np.asarray(cm, np.float64)
    gt, pr, tp = cm.sum(1), cm.sum(0), np.diag(cm)
    denom = gt + pr
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2.0 * tp / denom
    if ignore_empty:
        return np.where(gt > 0, dice, np.nan)
    return np.where(denom > 0, dice, 1.0)


def dice_per_class(
    pred: np.ndarray,
    label: np.ndarray,
    num_classes: int,
    *,
    include_background: bool = False,
    ignore_empty: bool = True,
) -> np.ndarray:
    """Dice of classes ``1..K-1`` (or ``0..K-1`` with ``include_background``) of one volume."""
    dice = dice_from_confusion(confusion_matrix(pred, label, num_classes), ignore_empty)
    return dice if include_background else dice[1:]


def whole_foreground_dice(pred: np.ndarray, label: np.ndarray, *, ignore_empty: bool = True) -> float:
    """Dice of all foreground classes merged (whole heart for MM-WHS)."""
    pred, label = _check_pair(pred, label)
    p, g = pred > 0, label > 0
    cm = np.array([[0, 0], [0, np.count_nonzero(p & g)]])
    cm[1, 0] = np.count_nonzero(g) - cm[1, 1]
    cm[0, 1] = np.count_nonzero(p) - cm[1, 1]
    return float(dice_from_confusion(cm, ignore_empty)[1])


# ----------------------------------------------------------------------------------- surface distance


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    s = np.asarray(spacing, np.float64)
    if s.ndim == 0:
        s = np.full(ndim, float(s))
    if s.shape != (ndim,) or np.any(s <= 0):
        raise ValueError(
            f"spacing must be {ndim} positive numbers (mm per voxel, array-axis order), got {spacing}."
        )
    return tuple(float(v) for v in s)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: ``mask XOR erosion(mask)`` with a cross structuring element, zero border."""
    mask = np.asarray(mask, bool)
    return mask ^ ndimage.binary_erosion(mask, border_value=0)


def surface_distances(
    pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: float | Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each prediction surface voxel to the GT surface, and GT → prediction.

    Works on the union's bounding box plus a one-voxel zero margin, which gives exactly the full-volume
    result (all surface voxels lie inside it) at a fraction of the cost. If one mask is empty its
    direction is empty and the other direction is ``inf``; both empty → two empty arrays.
    """
    pred_mask, gt_mask = _check_pair(np.asarray(pred_mask, bool), np.asarray(gt_mask, bool))
    sampling = _spacing(spacing, pred_mask.ndim)
    union = pred_mask | gt_mask
    if not union.any():
        return np.zeros(0), np.zeros(0)
    box = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(hit[0], hit[-1] + 1))
    box = tuple(box)
    p = np.pad(pred_mask[box], 1)
    g = np.pad(gt_mask[box], 1)
    sp, sg = surface_voxels(p), surface_voxels(g)
    if not sp.any():
        return np.zeros(0), np.full(int(sg.sum()), np.inf)
    if not sg.any():
        return np.full(int(sp.sum()), np.inf), np.zeros(0)
    to_gt = ndimage.distance_transform_edt(~sg, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=sampling)
    return to_gt[sp], to_pred[sg]


def _hd_assd(d_pg: np.ndarray, d_gp: np.ndarray, percentile: float | None) -> tuple[float, float]:
    """(Hausdorff, ASSD) from the two directed distance sets, with the empty-mask conventions."""
    if d_pg.size == 0 and d_gp.size == 0:
        return math.nan, math.nan
    if d_pg.size == 0 or d_gp.size == 0 or np.isinf(d_pg).any() or np.isinf(d_gp).any():
        return math.inf, math.inf
    if percentile is None:
        hd = max(d_pg.max(), d_gp.max())
    else:
        hd = max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile))
    return float(hd), float(np.concatenate([d_pg, d_gp]).mean())


def hausdorff_distance(
    pred_mask: np.ndarray,
    gt_mask: np.ndarray,
    spacing: float | Sequence[float] | None = None,
    percentile: float | None = 95.0,
) -> float:
    """Symmetric (percentile) Hausdorff distance in mm: max of the two directed percentiles.

    ``percentile=None`` gives the classic (max) Hausdorff distance. NaN if both masks are empty,
    ``inf`` if exactly one is.
    """
    if percentile is not None and not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
    return _hd_assd(*surface_distances(pred_mask, gt_mask, spacing), percentile)[0]


def average_surface_distance(
    pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: float | Sequence[float] | None = None
) -> float:
    """Average symmetric surface distance (ASSD) in mm: mean of both directions' distances pooled."""
    return _hd_assd(*surface_distances(pred_mask, gt_mask, spacing), None)[1]


# ------------------------------------------------------------------------------------- per volume


def _class_boxes(pred: np.ndarray, label: np.ndarray, num_classes: int) -> list[tuple[slice, ...]]:
    """Per class, the bounding box of its voxels in prediction or label (empty box if neither)."""
    found_p = ndimage.find_objects(pred, max_label=num_classes - 1)
    found_g = ndimage.find_objects(label, max_label=num_classes - 1)
    boxes = [tuple(slice(0, 0) for _ in pred.shape)]
    for a, b in zip(found_p, found_g):
        if a is None or b is None:
            boxes.append(a or b or tuple(slice(0, 0) for _ in pred.shape))
        else:
            boxes.append(tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b)))
    return boxes


def evaluate_volume(
    pred: np.ndarray,
    label: np.ndarray,
    *,
    spacing: float | Sequence[float] | None,
    class_names: Sequence[str],
    num_classes: int | None = None,
    key: str | None = None,
    modality_name: str | None = None,
    union_name: str = "whole_foreground",
    distances: bool = True,
    percentile: float = 95.0,
) -> dict[str, Any]:
    """All metrics of one volume (label maps of equal shape, spacing in mm per array axis).

    Returns ``{"key", "modality_name", "mean_dice", "<union_name>_dice", "classes": {name: {"dice",
    "hd95_mm", "assd_mm"}}}`` for the foreground classes ``1..K-1`` named by ``class_names``;
    ``mean_dice`` is the NaN-ignoring mean over those classes. ``distances=False`` skips HD95/ASSD.
    """
    pred, label = _check_pair(pred, label)
    num_classes = num_classes or len(class_names) + 1
    if len(class_names) != num_classes - 1:
        raise ValueError(
            f"class_names has {len(class_names)} names but num_classes={num_classes} needs "
            f"{num_classes - 1} foreground names (background 0 is unnamed)."
        )
    dice = dice_per_class(pred, label, num_classes)
    boxes = _class_boxes(pred, label, num_classes)
    classes: dict[str, dict[str, float]] = {}
    for c, name in enumerate(class_names, start=1):
        entry = {"dice": float(dice[c - 1])}
        if distances:
            box = boxes[c]
            hd, assd = _hd_assd(*surface_distances(pred[box] == c, label[box] == c, spacing), percentile)
            entry["hd95_mm"], entry["assd_mm"] = hd, assd
        classes[name] = entry
    return {
        "key": key,
        "modality_name": modality_name,
        "mean_dice": _nanmean(dice),
        f"{union_name}_dice": whole_foreground_dice(pred, label),
        "classes": classes,
    }


# ------------------------------------------------------------------------------------- aggregation


def _aggregate(
    volumes: Sequence[Mapping[str, Any]], class_names: Sequence[str], union_key: str
) -> dict[str, Any]:
    classes: dict[str, dict[str, Any]] = {}
    for name in class_names:
        rows = [v["classes"][name] for v in volumes if name in v["classes"]]
        dice = [r["dice"] for r in rows]
        entry: dict[str, Any] = {
            "dice": _nanmean(dice),
            "n_volumes": int(np.sum(~np.isnan(np.asarray(dice, float)))),
        }
        for k in DISTANCE_KEYS:
            vals = np.asarray([r[k] for r in rows if k in r], np.float64)
            if vals.size:
                entry[k] = _finite_mean(vals)
                entry[k.replace("_mm", "_n_inf")] = int(np.isinf(vals).sum())
        classes[name] = entry
    out: dict[str, Any] = {"mean_dice": _nanmean([c["dice"] for c in classes.values()])}
    for k in DISTANCE_KEYS:
        if any(k in c for c in classes.values()):
            out[f"mean_{k}"] = _nanmean([c.get(k, math.nan) for c in classes.values()])
    out[union_key] = _nanmean([v[union_key] for v in volumes])
    out["n_volumes"] = len(volumes)
    out["classes"] = classes
    return out


def summarize(
    volumes: Sequence[Mapping[str, Any]], class_names: Sequence[str], union_name: str = "whole_foreground"
) -> dict[str, Any]:
    """Per-volume results (:func:`evaluate_volume`) → the results.json contract.

    ``{"mean_dice", "modalities": {name: {"mean_dice", "mean_hd95_mm", "mean_assd_mm",
    "<union_name>_dice", "n_volumes", "classes": {class: {"dice", "n_volumes", "hd95_mm",
    "hd95_n_inf", "assd_mm", "assd_n_inf"}}}}, "volumes": [...]}``. Per class: mean over volumes (Dice
    ignoring NaN, distances over finite values, ``*_n_inf`` counting infinite ones); per modality: mean
    over classes. The top-level ``mean_dice`` pools all volumes (per-class mean over every volume, then
    over classes: MI-Seg's model-selection number), so it is not the mean of the modality means.
    """
    union_key = f"{union_name}_dice"
    by_modality: dict[str, list[Mapping[str, Any]]] = {}
    for v in volumes:
        by_modality.setdefault(str(v.get("modality_name")), []).append(v)
    pooled = _aggregate(volumes, class_names, union_key) if volumes else {"mean_dice": math.nan}
    return {
        "mean_dice": pooled["mean_dice"],
        "modalities": {m: _aggregate(vs, class_names, union_key) for m, vs in by_modality.items()},
        "volumes": [dict(v) for v in volumes],
    }


def json_safe(tree: Any) -> Any:
    """Nested results → strict JSON values: numpy scalars to Python, NaN to None, ±inf to "inf"/"-inf"."""
    if isinstance(tree, Mapping):
        return {str(k): json_safe(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [json_safe(v) for v in tree]
    if isinstance(tree, (str, bool)) or tree is None:
        return tree
    arr = np.asarray(tree)
    if arr.dtype.kind not in "biuf":
        return str(tree)
    if arr.ndim:
        return [json_safe(v) for v in arr.tolist()]
    value = arr.item()
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            return None
        return "inf" if value > 0 else "-inf"
    return value
