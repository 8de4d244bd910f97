"""Post-processing of label maps: keep only the largest connected component of chosen classes.

Whether a class gains from it is decided on validation volumes, as nnU-Net decides: for each modality
and class, the component filter is kept only where it raises that class's mean validation Dice
(:func:`decide`). Removing components of one class only turns its voxels into background, so the
decision of each class is independent of the others. The decision is saved in the run
(``postprocessing.json``) and applied by prediction on the model's grid, where it was decided.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

# Face-connected components (6-neighbourhood), nnU-Net's and scipy's default structuring element.
_STRUCTURE = ndimage.generate_binary_structure(3, 1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of a boolean mask (ties: the first in scan order)."""
    components, count = ndimage.label(mask, structure=_STRUCTURE)
    if count <= 1:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(components.ravel())[1:]
    return components == 1 + int(np.argmax(sizes))


def keep_largest_component(labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """``labels`` with every voxel of each class in ``classes`` outside that class's largest component
    set to background (0)."""
    out = np.array(labels, copy=True)
    for c in classes:
        mask = out == c
        if mask.any():
            out[mask & ~largest_component(mask)] = 0
    return out


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    denom = int(pred.sum()) + int(gt.sum())
    return float(2 * np.logical_and(pred, gt).sum() / denom) if denom else float("nan")


def candidate_dice(
    labels: np.ndarray, target: np.ndarray, num_classes: int
) -> dict[int, tuple[float, float]]:
    """Per foreground class present in ``target``: (Dice as predicted, Dice with only the largest
    component of the class kept)."""
    out = {}
    for c in range(1, num_classes):
        gt = target == c
        if not gt.any():
            continue
        pred = labels == c
        out[c] = (_dice(pred, gt), _dice(largest_component(pred) if pred.any() else pred, gt))
    return out


def decide(
    candidates: Sequence[tuple[str, Mapping[int, tuple[float, float]]]], class_names: Sequence[str]
) -> dict[str, Any]:
    """The decision from :func:`candidate_dice` of each validation volume (``(modality_name, dice)``).

    Returns ``{"largest_component": {modality: [class names]}, "dice": {modality: {class: {"without",
    "with", "volumes"}}}}``: a class is listed where its mean Dice over the volumes is higher with the
    filter than without (strictly, so a tie keeps the prediction as it is).
    """
    sums: dict[str, dict[int, list[float]]] = {}
    for modality, per_class in candidates:
        for c, (without, with_) in per_class.items():
            acc = sums.setdefault(modality, {}).setdefault(c, [0.0, 0.0, 0])
            acc[0] += without
            acc[1] += with_
            acc[2] += 1
    keep: dict[str, list[str]] = {}
    dice: dict[str, dict[str, dict[str, float]]] = {}
    for modality, per_class in sorted(sums.items()):
        keep[modality] = []
        dice[modality] = {}
        for c, (without, with_, n) in sorted(per_class.items()):
            name = class_names[c]
            dice[modality][name] = {"without": without / n, "with": with_ / n, "volumes": n}
            if with_ > without:
                keep[modality].append(name)
    return {"largest_component": keep, "dice": dice}
