"""Every fact about the MM-WHS 2017 whole-heart dataset that cinjax uses, in one place.

* Label codes of the seven substructures and the class ids MI-Seg trains on (the inverse of MI-Seg's
  ``predict_whs.py`` table, docs/mi-seg-spec.md §6.3); 0 is background.
* Class names in that order, and the name of the all-foreground union ("whole heart").
* MI-Seg's validation ids (``CT.json``, ``MR.json``) for the raw folder layout.
* The raw folder layout: ``<root>/<m>_train/<m>_train_<id>_image.nii.gz`` (+ ``_label``) and
  ``<root>/<m>_test/<m>_test_<id>_image.nii.gz``, with ``<m>`` the lower-cased modality name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

# File label code -> class id, in MI-Seg's class order.
CODES: dict[int, int] = {500: 1, 600: 2, 420: 3, 550: 4, 205: 5, 820: 6, 850: 7}
CODE_NAMES = {
    500: "left ventricle blood cavity",
    600: "right ventricle blood cavity",
    420: "left atrium blood cavity",
    550: "right atrium blood cavity",
    205: "left ventricle myocardium",
    820: "ascending aorta",
    850: "pulmonary artery",
}
CLASS_NAMES = ("background", "LV", "RV", "LA", "RA", "Myo", "AA", "PA")
NUM_CLASSES = len(CLASS_NAMES)
UNION_NAME = "whole_heart"  # metrics report f"{UNION_NAME}_dice": every foreground class merged
MODALITIES = {"CT": 0, "MR": 1}  # MI-Seg's datalists: modality 0 in CT*.json, 1 in MR*.json
VALIDATION_IDS = {"CT": (1002, 1003, 1013, 1018), "MR": (1002, 1009, 1017, 1018)}

_FILE_RE = r"^{prefix}_{part}_(\d+)_{suffix}\.nii(\.gz)?$"


def discover(
    root: str,
    modality_names: Sequence[str],
    validation_ids: Mapping[str, Sequence[int]],
    image_suffix: str = "image",
    label_suffix: str = "label",
) -> tuple[dict[str, list[tuple[str, str | None, str, str]]], list[str]]:
    """Volumes of the raw MM-WHS folder layout under ``root``.

    Returns ``({split: [(image, label | None, modality_name, folder), ...]}, problems)``: training
    volumes are split into training / validation by ``validation_ids[name]``; ``*_test`` folders give
    unlabelled test images. Problems (a missing label file, a validation id without an image, nothing
    found at all) are listed, each naming the path.
    """
    found: dict[str, list[tuple[str, str | None, str, str]]] = {
        "training": [],
        "validation": [],
        "test": [],
    }
    problems: list[str] = []
    for name in modality_names:
        prefix = name.lower()
        train_dir = os.path.join(root, f"{prefix}_train")
        val_ids = {int(i) for i in validation_ids.get(name, ())}
        if os.path.isdir(train_dir):
            pattern = re.compile(_FILE_RE.format(prefix=prefix, part="train", suffix=re.escape(image_suffix)))
            seen = set()
            for fname in sorted(os.listdir(train_dir)):
                m = pattern.match(fname)
                if not m:
                    continue
                seen.add(int(m.group(1)))
                image = os.path.join(train_dir, fname)
                ext = ".nii.gz" if fname.endswith(".gz") else ".nii"
                label = os.path.join(train_dir, f"{prefix}_train_{m.group(1)}_{label_suffix}{ext}")
                if not os.path.exists(label):
                    problems.append(f"{label}: label file for {image} does not exist.")
                    continue
                split = "validation" if int(m.group(1)) in val_ids else "training"
                found[split].append((image, label, name, train_dir))
            missing = sorted(val_ids - seen)
            if missing:
                problems.append(
                    f"{train_dir}: validation ids {missing} (data.mmwhs.validation_ids['{name}']) "
                    "have no image file."
                )
        test_dir = os.path.join(root, f"{prefix}_test")
        if os.path.isdir(test_dir):
            pattern = re.compile(_FILE_RE.format(prefix=prefix, part="test", suffix="image"))
            for fname in sorted(os.listdir(test_dir)):
                if pattern.match(fname):
                    found["test"].append((os.path.join(test_dir, fname), None, name, test_dir))
    if not any(found.values()):
        example = os.path.join(root, "ct_train", f"ct_train_1001_{image_suffix}.nii.gz")
        problems.append(
            f"{root}: no MM-WHS volumes found; expected e.g. {example} for modalities {list(modality_names)}."
        )
    return found, problems
