"""Voxel-grid geometry: RAS reorientation, MONAI ``Spacingd``-style resampling, and its inversion.

Preprocessing (:mod:`cinjax.data.preprocess`) maps a source volume to the cached grid with these
functions and records what it did in the cache entry's metadata; prediction maps a label map on the
cached grid back to the source file's grid with :func:`invert_to_original`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np

_RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))
_AFFINE_TOL = 1e-4  # MONAI's AFFINE_TOL: below this a resampling is skipped


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient to the closest RAS voxel order -> (array, new affine, ornt used)."""
    ornt = nib.orientations.io_orientation(affine)
    out = nib.orientations.apply_orientation(array, ornt)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)
    return np.ascontiguousarray(out), new_affine, ornt


def from_ras(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Undo :func:`to_ras` given the ``ornt`` it returned."""
    back = nib.orientations.ornt_transform(_RAS, np.asarray(ornt, np.float64))
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, back))


def _zoom_affine(affine: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """MONAI ``zoom_affine(diagonal=False)``: keep the rotation, set the voxel size, drop shear/shift."""
    rzs = affine[:3, :3]
    zs = np.linalg.cholesky(rzs.T @ rzs).T
    rotation = rzs @ np.linalg.inv(zs)
    out = np.eye(4)
    out[:3, :3] = rotation @ np.diag(np.sign(np.diag(zs)) * np.abs(np.asarray(spacing, np.float64)))
    return out


def resampled_grid(
    affine: np.ndarray, shape: Sequence[int], spacing: Sequence[float]
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of MONAI ``Spacing(pixdim=spacing)`` output (``compute_shape_offset``)."""
    shape_f = np.asarray(shape, np.float64)
    new = _zoom_affine(affine, spacing)
    corners = np.asarray(np.meshgrid(*[(0.0, n - 1.0) for n in shape_f], indexing="ij")).reshape(3, -1)
    corners = np.concatenate([corners, np.ones((1, corners.shape[1]))])
    out_corners = np.linalg.solve(new, affine) @ corners
    all_dist = out_corners[:-1].copy()
    out_shape = np.round(np.ptp(out_corners[:-1] / out_corners[-1], axis=1) + 1.0)
    world = affine @ corners
    offset = None
    for i in range(corners.shape[1]):
        if np.allclose(np.min(all_dist - all_dist[:, i : i + 1], 1), 0.0, rtol=_AFFINE_TOL):
            offset = world[:-1, i]
            break
    if offset is None:  # no corner is the minimum on every axis: centre-align (MONAI's fallback)
        offset = affine[:3, :3] @ (shape_f / 2.0) + affine[:3, 3] - new[:3, :3] @ (out_shape / 2.0)
    new[:3, 3] = offset
    return new, tuple(int(s) for s in out_shape)


def resample(
    array: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: Sequence[int], mode: str
) -> np.ndarray:
    """Sample ``array`` (grid ``src_affine``) on the grid (``dst_affine``, ``dst_shape``).

    ``mode`` is ``"linear"`` (trilinear, float64 maths, float32 out) or ``"nearest"`` (round half to
    even, dtype kept). Coordinates outside the volume are clamped to it (MONAI ``padding_mode="border"``).
    """
    xform = np.linalg.solve(src_affine, dst_affine)
    dst_shape = tuple(int(s) for s in dst_shape)
    if np.allclose(xform, np.eye(4), atol=_AFFINE_TOL) and dst_shape == tuple(array.shape):
        return array.astype(np.float32 if mode == "linear" else array.dtype, copy=True)
    if mode not in ("linear", "nearest"):
        raise ValueError(f"resample mode {mode!r}: expected 'linear' or 'nearest'.")
    src_shape = array.shape
    if np.allclose(xform[:3, :3], np.diag(np.diag(xform[:3, :3])), atol=1e-12):
        # Axis-aligned: separable per-axis sampling (exactly trilinear / nearest, much faster).
        out = array
        # Shrinking axes first keeps the intermediates small (the result does not depend on the order).
        for ax in sorted(range(3), key=lambda a: dst_shape[a] / src_shape[a]):
            coords = np.clip(xform[ax, ax] * np.arange(dst_shape[ax]) + xform[ax, 3], 0, src_shape[ax] - 1)
            if mode == "nearest":
                out = np.take(out, np.rint(coords).astype(np.int64), axis=ax)
            else:
                lo = np.floor(coords).astype(np.int64)
                hi = np.minimum(lo + 1, src_shape[ax] - 1)
                w = (coords - lo).reshape([-1 if a == ax else 1 for a in range(3)])
                out = np.take(out, lo, axis=ax) * (1.0 - w) + np.take(out, hi, axis=ax) * w
        return out.astype(np.float32) if mode == "linear" else np.asarray(out, array.dtype)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in dst_shape], indexing="ij"))
    coords = np.einsum("ij,j...->i...", xform[:3, :3], grid) + xform[:3, 3].reshape(3, 1, 1, 1)
    for ax in range(3):
        coords[ax] = np.clip(coords[ax], 0, src_shape[ax] - 1)
    if mode == "nearest":
        idx = np.rint(coords).astype(np.int64)
        return array[idx[0], idx[1], idx[2]]
    from scipy import ndimage  # general (sheared) grids only

    return ndimage.map_coordinates(np.asarray(array, np.float64), coords, order=1, mode="nearest").astype(
        np.float32
    )


def invert_to_original(pred: np.ndarray, meta: Mapping[str, Any], mode: str = "nearest") -> np.ndarray:
    """Undo padding, resampling and reorientation of a map on the preprocessed grid.

    ``pred`` has the preprocessed volume's shape (``meta["shape"]``), optionally with a trailing channel
    axis (e.g. class probabilities); ``mode`` is ``"nearest"`` for label maps, ``"linear"`` for
    continuous maps (each channel resampled on its own). The result has the source file's voxel grid,
    so it can be written with ``meta["original"]["affine"]`` (see :func:`original_affine`).
    """
    pred = np.asarray(pred)
    if tuple(pred.shape[:3]) != tuple(meta["shape"]) or pred.ndim not in (3, 4):
        raise ValueError(
            f"prediction shape {pred.shape} != preprocessed volume shape {tuple(meta['shape'])} "
            f"of {meta.get('source', {}).get('image', 'the volume')}."
        )
    pads = meta["pad"]
    res_shape = meta["resampled"]["shape"]
    pred = pred[tuple(slice(p[0], p[0] + n) for p, n in zip(pads, res_shape))]

    def back(x: np.ndarray) -> np.ndarray:
        x = resample(
            x,
            np.asarray(meta["resampled"]["affine"]),
            np.asarray(meta["ras"]["affine"]),
            meta["ras"]["shape"],
            mode,
        )
        return from_ras(x, np.asarray(meta["ornt"]))

    if pred.ndim == 3:
        return back(pred)
    return np.stack([back(pred[..., k]) for k in range(pred.shape[-1])], axis=-1)


def original_affine(meta: Mapping[str, Any]) -> np.ndarray:
    """The source file's affine (write :func:`invert_to_original` output with it)."""
    return np.asarray(meta["original"]["affine"], np.float64)
