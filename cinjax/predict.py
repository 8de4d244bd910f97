"""Prediction: label maps in each input's original geometry, with the dataset's label codes.

``mode=predict`` segments ``predict.split`` of the datalists (or every NIfTI in ``predict.input_dir``)
and writes ``<workdir>/predictions/*.nii.gz``: the padding, resampling and reorientation of
preprocessing undone, class ids mapped back to the label codes, uint16, the input's affine, named like
MI-Seg's outputs (``…_image`` → ``…_label``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np
import tqdm
from absl import logging

from cinjax import build, distributed, inference
from cinjax.data import cache, geometry
from cinjax.data.io import write_nifti
from cinjax.workdir import Workdir


def output_name(source: str) -> str:
    """The prediction's file name for a source image: ``…image…`` → ``…label….nii.gz``."""
    base = os.path.basename(source)
    for ext in (".nii.gz", ".nii"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    out = base.replace("image", "label") if "image" in base else base + "_label"
    return out + ".nii.gz"


def _folder_data(config: ml_collections.ConfigDict, run: Workdir) -> ml_collections.ConfigDict:
    """A data section whose ``test`` split is every NIfTI in ``predict.input_dir`` (one modality),
    through a datalist written in the workdir."""
    pc = config.predict
    folder = os.path.abspath(os.path.expanduser(pc.input_dir))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"config.predict.input_dir={pc.input_dir!r} is not a directory.")
    names = sorted(f for f in os.listdir(folder) if f.endswith((".nii", ".nii.gz")))
    if not names:
        raise FileNotFoundError(f"No .nii/.nii.gz files in config.predict.input_dir={folder!r}.")
    if pc.modality_name not in config.data.modalities:
        raise ValueError(
            f"config.predict.modality_name={pc.modality_name!r} is not one of the configured modalities "
            f"{sorted(config.data.modalities)}."
        )
    path = run.path("predict_datalist.json")
    if distributed.is_main_process():
        with open(path, "w") as f:
            doc = {
                "modality": pc.modality_name,
                "training": [],
                "validation": [],
                "test": [{"image": os.path.join(folder, n)} for n in names],
            }
            json.dump(doc, f, indent=1)
    distributed.sync("predict_datalist")
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.layout, data.root, data.json_lists, data.data_dirs = "json", "/", (path,), ()
    return data


def predict(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    model: Any = None,
    params: Any = None,
    model_state: Any = None,
) -> list[str]:
    """``mode=predict`` (or after training, with the trained ``model`` and variables): segment and
    write ``<workdir>/predictions/*.nii.gz``; returns the written paths."""
    pc = config.predict
    run = Workdir(workdir)
    if model is None:
        run.check(int(config.train.min_free_gb * (1 << 30)))
        run.save_config(config)
        build.generate_phantom(config.data)
        model, variables = build.restore_for_inference(config, pc.checkpoint, run.root)
        params, model_state = variables.params, variables.model_state
    data = _folder_data(config, run) if pc.input_dir else config.data
    split = "test" if pc.input_dir else pc.split
    prepared = build.prepare_data(data, (split,))
    class_to_code = np.zeros(max(prepared.num_classes, 1), np.int64)
    for code, cls in prepared.label_codes.items():
        class_to_code[cls] = code
    if class_to_code.max() > np.iinfo(np.uint16).max:
        raise ValueError("Label codes do not fit a uint16 NIfTI.")
    records = prepared.all_records(split)
    if not records:
        raise ValueError(f"No volumes to predict in split {split!r}.")
    window = build.window_settings(config)
    mesh = build.inference_mesh(window.windows_per_call)
    predict_fn = build.WindowPredictor(model, mesh).bind(params, model_state)
    os.makedirs(run.predictions_dir, exist_ok=True)
    written = []
    show = distributed.is_main_process()
    for rec in tqdm.tqdm(records, desc="predict", unit="vol", disable=not show, leave=False):
        meta = cache.read_meta(rec.path)
        image, _ = cache.read_volume(rec)
        pred = inference.predict_volume(
            predict_fn, image[..., None], rec.modality, window, num_classes=prepared.num_classes, mesh=mesh
        )
        labels = geometry.invert_to_original(pred.labels, meta)
        path = os.path.join(run.predictions_dir, output_name(meta["source"]["image"]))
        if distributed.is_main_process():
            write_nifti(path, class_to_code[labels].astype(np.uint16), geometry.original_affine(meta))
        written.append(path)
    logging.info("Wrote %d predictions to %s.", len(written), run.predictions_dir)
    return written
