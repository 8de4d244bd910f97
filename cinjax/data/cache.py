"""On-disk cache of preprocessed volumes: tensorstore zarr3 arrays plus metadata.

One entry is a directory::

    <entry>/image.zarr   float32 (D, H, W), zarr3, chunked
    <entry>/label.zarr   uint8   (D, H, W)  (absent for unlabelled volumes)
    <entry>/fg.npy       int64 flat indices of label > 0            (pos crop centres)
    <entry>/bg.npy       int64 flat indices of label == 0 & image > 0  (neg crop centres)
    <entry>/meta.json    key, modality, shape, spacing, geometry, source hashes, settings

Entries are written to a temporary directory and renamed into place, so a crash or a bad volume never
leaves a half-written entry that a later run would trust. This module is the storage layer only; what
goes in an entry is decided by :mod:`cinjax.data.preprocess`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import uuid
from typing import Any

import numpy as np
import tensorstore as ts

CHUNK = 64
META = "meta.json"


@dataclasses.dataclass(frozen=True)
class VolumeRecord:
    """What the loader needs to know about one cached, preprocessed volume."""

    key: str
    modality: int
    path: str
    shape: tuple[int, int, int]
    has_label: bool

    @property
    def image_path(self) -> str:
        return os.path.join(self.path, "image.zarr")

    @property
    def label_path(self) -> str:
        return os.path.join(self.path, "label.zarr")


def _spec(path: str, dtype: str | None = None, shape=None) -> dict[str, Any]:
    spec: dict[str, Any] = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
    if shape is not None:
        chunks = [min(CHUNK, s) for s in shape]
        spec["metadata"] = {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
        }
    return spec


def _write_array(path: str, array: np.ndarray) -> None:
    dtype = {np.dtype(np.float32): "float32", np.dtype(np.uint8): "uint8"}[array.dtype]
    store = ts.open(_spec(path, dtype, array.shape), create=True, delete_existing=True).result()
    store.write(array).result()


@functools.lru_cache(maxsize=256)
def _open(path: str) -> ts.TensorStore:
    """Open (once per process) a cached array for reading."""
    return ts.open(_spec(path), open=True, read=True).result()


def write_entry(
    path: str,
    *,
    key: str,
    modality: int,
    image: np.ndarray,
    label: np.ndarray | None,
    meta: dict[str, Any],
) -> VolumeRecord:
    """Atomically write one entry (image, label, crop-centre candidates, metadata) to ``path``."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"{key}: cache entries hold 3D volumes, got shape {image.shape}.")
    if label is not None and label.shape != image.shape:
        raise ValueError(f"{key}: label shape {label.shape} != image shape {image.shape}.")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        _write_array(os.path.join(tmp, "image.zarr"), image)
        if label is not None:
            label = np.ascontiguousarray(label, dtype=np.uint8)
            _write_array(os.path.join(tmp, "label.zarr"), label)
            flat_label = label.reshape(-1)
            np.save(os.path.join(tmp, "fg.npy"), np.flatnonzero(flat_label > 0))
            np.save(
                os.path.join(tmp, "bg.npy"),
                np.flatnonzero((flat_label == 0) & (image.reshape(-1) > 0)),
            )
        full_meta = dict(
            meta, key=key, modality=int(modality), shape=list(image.shape), has_label=label is not None
        )
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(full_meta, f, indent=1)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _open.cache_clear()
    return load_record(path)


def read_meta(path: str) -> dict[str, Any]:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def load_record(path: str) -> VolumeRecord:
    """The :class:`VolumeRecord` of an existing entry (raises ``FileNotFoundError`` if incomplete)."""
    meta = read_meta(path)
    return VolumeRecord(
        key=meta["key"],
        modality=int(meta["modality"]),
        path=os.path.abspath(path),
        shape=tuple(meta["shape"]),
        has_label=bool(meta["has_label"]),
    )


def read_crop(
    record: VolumeRecord, start: tuple[int, int, int], size: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read the box ``[start, start + size)`` of image and label (box must lie inside the volume)."""
    box = tuple(slice(s, s + n) for s, n in zip(start, size))
    image = _open(record.image_path)[box].read().result()
    label = _open(record.label_path)[box].read().result() if record.has_label else None
    return image, label


def read_volume(record: VolumeRecord) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole preprocessed image (float32) and label (uint8, or None)."""
    image = _open(record.image_path).read().result()
    label = _open(record.label_path).read().result() if record.has_label else None
    return image, label


def load_candidates(record: VolumeRecord) -> tuple[np.ndarray, np.ndarray]:
    """Flat foreground / background crop-centre candidates (memory-mapped int64 arrays)."""
    fg = np.load(os.path.join(record.path, "fg.npy"), mmap_mode="r")
    bg = np.load(os.path.join(record.path, "bg.npy"), mmap_mode="r")
    return fg, bg
