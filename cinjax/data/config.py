"""Default ``config.data`` section (the keys are documented in :mod:`cinjax.data.preprocess`)."""

from __future__ import annotations

import ml_collections

from cinjax.data import mmwhs


def default_data_config() -> ml_collections.ConfigDict:
    """MI-Seg's data setup (MM-WHS): CT_fold1.json + MR.json under ``root``, 1 mm, min-max, ROI 96^3.

    Another dataset overrides ``json_lists``, ``modalities``, ``num_classes``, ``class_names`` and
    ``union_name`` (the all-foreground Dice is reported as ``<union_name>_dice``).
    """
    c = ml_collections.ConfigDict()
    c.root = ""
    c.layout = "json"
    c.json_lists = ("CT_fold1.json", "MR.json")
    c.data_dirs = ()
    c.modalities = dict(mmwhs.MODALITIES)
    c.mmwhs = ml_collections.ConfigDict(
        {
            "validation_ids": {k: tuple(v) for k, v in mmwhs.VALIDATION_IDS.items()},
            "image_suffix": "image",
            "label_suffix": "label",
        }
    )
    # "identity" | "mmwhs" | {code: class}: a reference typed `object` so a config may assign any of them.
    c.label_codes = ml_collections.FieldReference("identity", field_type=object)
    c.num_classes = mmwhs.NUM_CLASSES
    c.class_names = mmwhs.CLASS_NAMES
    c.union_name = "whole_foreground"  # MM-WHS configs: mmwhs.UNION_NAME ("whole_heart")
    c.spacing = (1.0, 1.0, 1.0)
    c.roi = (96, 96, 96)
    c.intensity = ml_collections.ConfigDict(
        {
            "mode": "minmax",
            "window": (-175.0, 250.0),
            "percentiles": (0.5, 99.5),
        }
    )
    c.intensity_by_modality = ml_collections.ConfigDict()
    c.affine_atol = 1e-3
    c.cache_dir = ""
    c.cache_fingerprint = "stat"
    c.preprocess_workers = 2
    return c
