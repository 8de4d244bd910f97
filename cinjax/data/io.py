"""NIfTI I/O with geometry, and the checks that turn bad inputs into errors naming the file.

Arrays are returned in the file's own voxel order (nibabel's ``dataobj`` order, i.e. axes i, j, k of
the affine). Images load as float32 (scale/intercept applied, like MONAI's ``LoadImaged``), labels as
int64 after checking that every value is an integer.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import zlib
from collections.abc import Mapping

import nibabel as nib
import numpy as np


class DataError(ValueError):
    """A problem with an input file or datalist; the message names the file and what to do."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where a voxel grid sits in world (scanner, RAS+ mm) space."""

    affine: np.ndarray  # (4, 4) float64, voxel index (i, j, k, 1) -> world mm
    shape: tuple[int, int, int]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (affine column norms, as MONAI computes it)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Closest anatomical direction of each array axis, e.g. ``('L', 'P', 'S')``."""
        return tuple(nib.aff2axcodes(self.affine))

    def to_json(self) -> dict:
        return {
            "affine": np.asarray(self.affine, np.float64).tolist(),
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "axcodes": list(self.axcodes),
        }


def _check_readable(path: str, what: str) -> None:
    """Name what is wrong when ``path`` is not a readable file (nibabel reports all of these as
    'no such file' or as a file it cannot parse)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DataError(
                f"{path}: {what} is a dangling symlink (it points to {os.readlink(path)!r}, which does "
                "not exist). Fix the link or the datalist entry."
            ) from None
        raise DataError(
            f"{path}: {what} file does not exist. Check the datalist entry and the data root."
        ) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(
                f"{path}: {what} is a symlink loop (its links point back to each other, never to a "
                "file). Point the link at the real file."
            ) from None
        raise DataError(f"{path}: cannot access the {what} ({e.strerror}).") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(
            f"{path}: {what} is a directory, not a file. Point the datalist entry at the NIfTI file "
            "(.nii / .nii.gz) itself."
        )
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise DataError(
            f"{path}: permission denied (cannot read the {what}). Make the file readable by this user "
            "(e.g. chmod a+r) or run as a user who can read it."
        ) from None


def _open(path: str, what: str) -> nib.Nifti1Image:
    _check_readable(path, what)
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises several types for unreadable headers
        raise DataError(
            f"{path}: cannot read the {what} as NIfTI ({type(e).__name__}: {e}). "
            "The file is corrupt, truncated or not NIfTI; re-export or re-download it."
        ) from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: {what} is a {type(img).__name__}, expected a NIfTI (.nii / .nii.gz) file.")
    return img


def _affine(img: nib.Nifti1Image, path: str, what: str) -> np.ndarray:
    """The file's affine; one that does not place the voxels in space (NaN, or singular: a zero
    voxel size or collinear axes, which reorientation cannot handle) is an error naming the file."""
    affine = np.asarray(img.affine, np.float64)
    if not np.isfinite(affine).all():
        raise DataError(
            f"{path}: {what} affine has NaN/inf entries; fix the header's sform / qform:\n{affine}"
        )
    if np.linalg.matrix_rank(affine[:3, :3]) < 3:  # the tolerance nibabel's io_orientation uses
        raise DataError(
            f"{path}: affine is singular (a zero voxel size / not invertible), so the {what} voxels "
            f"have no orientation; fix the header's sform / qform / pixdim:\n{affine}"
        )
    return affine


def _read_array(img: nib.Nifti1Image, path: str, what: str) -> np.ndarray:
    try:
        data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error) as e:
        raise DataError(
            f"{path}: the {what} voxel data is corrupt or truncated ({type(e).__name__}: {e}). "
            "Re-export or re-download the file."
        ) from e
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(
            f"{path}: the {what} has shape {tuple(img.shape)}; expected a 3D volume "
            "(a trailing singleton 4th dimension is accepted). Split multi-channel or "
            "time-series files into one 3D file per volume."
        )
    return data


def load_image(path: str) -> tuple[np.ndarray, Geometry]:
    """Load a 3D image as float32 with its geometry; rejects NaN/inf voxels."""
    img = _open(path, "image")
    affine = _affine(img, path, "image")
    data = _read_array(img, path, "image").astype(np.float32, copy=False)
    bad = ~np.isfinite(data)
    if bad.any():
        raise DataError(f"{path}: image has {int(bad.sum())} NaN/inf voxels. Fix or mask them before use.")
    return np.ascontiguousarray(data), Geometry(affine, tuple(data.shape))


def load_label(path: str) -> tuple[np.ndarray, Geometry]:
    """Load a 3D label map as an integer array (the file's integer dtype, or int64 for float files)
    with its geometry; rejects NaN/inf and non-integer values."""
    img = _open(path, "label")
    affine = _affine(img, path, "label")
    data = _read_array(img, path, "label")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.isfinite(data).all():
            raise DataError(f"{path}: label has NaN/inf voxels.")
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise DataError(
                f"{path}: label has non-integer values (e.g. {data[rounded != data].flat[0]}); "
                "a label map must hold integer class codes."
            )
        data = rounded.astype(np.int64)
    return np.ascontiguousarray(data), Geometry(affine, tuple(data.shape))


def check_pair(
    image_path: str, image_geom: Geometry, label_path: str, label_geom: Geometry, affine_atol: float = 1e-3
) -> None:
    """Image and label must share one voxel grid (same shape, affines equal within ``affine_atol`` mm)."""
    if image_geom.shape != label_geom.shape:
        raise DataError(
            f"{label_path}: label shape {label_geom.shape} does not match image shape "
            f"{image_geom.shape} of {image_path}."
        )
    diff = float(np.max(np.abs(image_geom.affine - label_geom.affine)))
    if diff > affine_atol:
        raise DataError(
            f"{label_path}: label affine differs from the affine of {image_path} by up to "
            f"{diff:.3g} (tolerance {affine_atol:g}); image and label must share a voxel grid. "
            f"Label affine:\n{label_geom.affine}\nimage affine:\n{image_geom.affine}"
        )


def map_label_codes(label: np.ndarray, codes: Mapping[int, int], path: str) -> np.ndarray:
    """Map file label codes to class ids 0..C-1 as uint8 (code 0 is background unless mapped)."""
    table = {0: 0, **{int(k): int(v) for k, v in codes.items()}}
    lo, hi = int(label.min()), int(label.max())
    if hi - lo < (1 << 20):  # a lookup table over the value range: one pass, no sort
        if lo == 0 and label.dtype.kind in "ui":  # non-negative: reinterpret as unsigned, no copy
            offset = label.view(label.dtype.str.replace("i", "u"))
        else:
            offset = label.astype(np.int64) - lo
        counts = np.bincount(offset.reshape(-1), minlength=hi - lo + 1)
        values = np.flatnonzero(counts) + lo
    else:
        offset, values = None, np.unique(label)
    unknown = [int(v) for v in values if int(v) not in table]
    if unknown:
        hint = ""
        if set(unknown) & {205, 420, 500, 550, 600, 820, 850}:
            hint = " These look like MM-WHS codes: set data.label_codes = 'mmwhs'."
        raise DataError(
            f"{path}: label values {unknown[:10]} are not in the label code map "
            f"(known codes {sorted(table)}).{hint}"
        )
    if offset is not None:
        lut = np.zeros(hi - lo + 1, np.uint8)
        for v in values:
            lut[int(v) - lo] = table[int(v)]
        return lut[offset]
    out = np.zeros(label.shape, np.uint8)
    for v in values:
        out[label == v] = table[int(v)]
    return out


def write_nifti(path: str, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a 3D array as NIfTI with the given affine (sform and qform both set, code 'scanner').

    int64 arrays (which NIfTI readers handle poorly) are stored as int32; label maps are best passed
    as uint8 / uint16.
    """
    array = np.asarray(array)
    if array.dtype == np.int64:
        array = array.astype(np.int32)
    img = nib.Nifti1Image(array, np.asarray(affine, np.float64))
    img.header.set_xyzt_units("mm")
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    nib.save(img, path)
