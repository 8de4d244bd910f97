"""On-disk cache of preprocessed volumes: tensorstore zarr3 arrays plus metadata.

One entry is a directory::

    <entry>/image.zarr   float32 (D, H, W), zarr3, chunked
    <entry>/label.zarr   uint8   (D, H, W)  (absent for unlabelled volumes)
    <entry>/fg.npy       int64 flat indices of label > 0            (pos crop centres)
    <entry>/bg.npy       int64 flat indices of label == 0 & image > 0  (neg crop centres)
    <entry>/meta.json    key, modality, shape, spacing, geometry, source hashes, settings, and the size
                         and CRC-32 of every other file of the entry

Entries are written to a temporary directory and renamed into place, so a crash or a bad volume never
leaves a half-written entry that a later run would trust; :func:`check_entry` finds entries damaged
later (a deleted chunk file would read as zeros, a truncated one fails in a loader worker). This module
is the storage layer only; what goes in an entry is decided by :mod:`cinjax.data.preprocess`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import uuid
import zlib
from typing import Any

import numpy as np
import tensorstore as ts

from cinjax.data.io import DataError

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


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _inventory(root: str) -> dict[str, list[int]]:
    """``relative path -> [size, CRC-32]`` of every file under ``root`` except the metadata."""
    out = {}
    for parent, _, names in os.walk(root):
        for name in names:
            full = os.path.join(parent, name)
            rel = os.path.relpath(full, root)
            if rel != META:
                out[rel] = [os.path.getsize(full), _crc32(full)]
    return dict(sorted(out.items()))


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
            meta,
            key=key,
            modality=int(modality),
            shape=list(image.shape),
            has_label=label is not None,
            files=_inventory(tmp),
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


def check_entry(path: str, content: bool = False) -> str | None:
    """What is wrong with the entry at ``path`` (a file missing or of another size than written; with
    ``content``, also changed bytes: reads the whole entry), or None when it is intact."""
    try:
        files = read_meta(path).get("files")
    except (OSError, ValueError) as e:
        return f"cannot read its {META} ({e})"
    if not isinstance(files, dict):
        return f"its {META} has no file list (written by an older cinjax)"
    for rel, (size, crc) in files.items():
        full = os.path.join(path, rel)
        try:
            found = os.path.getsize(full)
        except OSError as e:
            return f"{rel}: {e.strerror}"
        if found != size:
            return f"{rel} has {found} bytes, {size} were written"
        if content and _crc32(full) != crc:
            return f"{rel} has changed since it was written (CRC-32 mismatch)"
    return None


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


def _read(record: VolumeRecord, path: str, box: tuple[slice, ...] = ()) -> np.ndarray:
    """Read ``box`` of one array of an entry; a damaged entry is a :class:`DataError` saying what to do."""
    try:
        return _open(path)[box].read().result()
    except ValueError as e:
        raise DataError(
            f"{record.path}: cannot read the cached volume {record.key} ({e}); the cache entry is "
            "damaged. Run `python -m cinjax.data prepare` with the same config to rebuild it."
        ) from e


def read_crop(
    record: VolumeRecord, start: tuple[int, int, int], size: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read the box ``[start, start + size)`` of image and label (box must lie inside the volume)."""
    if any(s < 0 or s + n > d for s, n, d in zip(start, size, record.shape)):
        raise ValueError(f"{record.key}: box at {start} of size {size} exceeds the volume {record.shape}.")
    box = tuple(slice(s, s + n) for s, n in zip(start, size))
    image = _read(record, record.image_path, box)
    label = _read(record, record.label_path, box) if record.has_label else None
    return image, label


def read_volume(record: VolumeRecord) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole preprocessed image (float32) and label (uint8, or None)."""
    image = _read(record, record.image_path)
    label = _read(record, record.label_path) if record.has_label else None
    return image, label


def load_candidates(record: VolumeRecord) -> tuple[np.ndarray, np.ndarray]:
    """Flat foreground / background crop-centre candidates (memory-mapped int64 arrays)."""
    fg = np.load(os.path.join(record.path, "fg.npy"), mmap_mode="r")
    bg = np.load(os.path.join(record.path, "bg.npy"), mmap_mode="r")
    return fg, bg
