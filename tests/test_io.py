"""NIfTI I/O: dtypes, geometry, exact round trips, accepted variants, and paths that are not
readable NIfTI files."""

import builtins
import os

import nibabel as nib
import numpy as np
import pytest

from cinjax.data import io


def _affine(codes="LPS", spacing=(0.8, 1.3, 2.0), origin=(10.0, -20.0, 5.0)):
    aff = np.eye(4)
    for i, (ax, flip) in enumerate(nib.orientations.axcodes2ornt(tuple(codes))):
        aff[:3, i] = 0
        aff[int(ax), i] = flip * spacing[i]
    aff[:3, 3] = origin
    return aff


def test_write_and_load_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(20, 24, 16)).astype(np.float32)
    label = rng.integers(0, 3, size=(20, 24, 16)).astype(np.uint8)
    aff = _affine()
    io.write_nifti(str(tmp_path / "i.nii.gz"), image, aff)
    io.write_nifti(str(tmp_path / "l.nii.gz"), label, aff)
    got, geom = io.load_image(str(tmp_path / "i.nii.gz"))
    assert got.dtype == np.float32 and np.array_equal(got, image)
    # NIfTI stores the sform in float32: the affine comes back exactly at that precision.
    np.testing.assert_array_equal(geom.affine, aff.astype(np.float32))
    assert geom.shape == (20, 24, 16)
    np.testing.assert_allclose(geom.spacing, (0.8, 1.3, 2.0), rtol=1e-7)
    assert geom.axcodes == ("L", "P", "S")
    lab, lgeom = io.load_label(str(tmp_path / "l.nii.gz"))
    assert np.issubdtype(lab.dtype, np.integer) and np.array_equal(lab, label)
    np.testing.assert_array_equal(lgeom.affine, geom.affine)
    # The file is readable by plain nibabel with the same sform/qform.
    img = nib.load(str(tmp_path / "l.nii.gz"))
    np.testing.assert_allclose(img.get_qform(), aff, atol=1e-5)
    assert int(img.header["sform_code"]) == 1


def test_geometry_json_round_trip():
    geom = io.Geometry(_affine("PIL", (1.7, 0.6, 1.1)), (4, 5, 6))
    d = geom.to_json()
    assert d["axcodes"] == ["P", "I", "L"] and d["spacing"] == pytest.approx([1.7, 0.6, 1.1])
    np.testing.assert_array_equal(np.asarray(d["affine"]), geom.affine)
    assert d["shape"] == [4, 5, 6]


def test_trailing_singleton_4th_dim_is_squeezed(tmp_path):
    image = np.arange(20 * 24 * 16, dtype=np.float32).reshape(20, 24, 16, 1)
    nib.save(nib.Nifti1Image(image, _affine()), str(tmp_path / "i.nii.gz"))
    got, geom = io.load_image(str(tmp_path / "i.nii.gz"))
    assert got.shape == geom.shape == (20, 24, 16)
    np.testing.assert_array_equal(got, image[..., 0])


def test_scaled_and_float_files(tmp_path):
    # int16 with slope/intercept (common for CT): values are scaled like MONAI's LoadImage.
    raw = np.arange(20 * 24 * 16, dtype=np.int16).reshape(20, 24, 16)
    img = nib.Nifti1Image(raw, _affine())
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "ct.nii.gz"))
    got, _ = io.load_image(str(tmp_path / "ct.nii.gz"))
    np.testing.assert_array_equal(got, raw.astype(np.float32) * 2 - 1024)
    # A label stored as float with integral values is accepted.
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 500.0, np.float32), np.eye(4)), str(tmp_path / "l.nii.gz"))
    lab, _ = io.load_label(str(tmp_path / "l.nii.gz"))
    assert lab.dtype == np.int64 and (lab == 500).all()


def test_map_label_codes():
    lab = np.array([[[0, 500, 205], [850, 0, 420]]])
    out = io.map_label_codes(lab, {500: 1, 600: 2, 420: 3, 550: 4, 205: 5, 820: 6, 850: 7}, "x.nii.gz")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[[0, 1, 5], [7, 0, 3]]])
    for dtype in (np.int16, np.uint16, np.int32):
        out = io.map_label_codes(lab.astype(dtype), {500: 1, 420: 3, 205: 5, 850: 7}, "x")
        np.testing.assert_array_equal(out, [[[0, 1, 5], [7, 0, 3]]])
    # Negative codes and a value range too wide for a lookup table.
    np.testing.assert_array_equal(
        io.map_label_codes(np.array([[[-1, 0, 3]]], np.int16), {-1: 2, 3: 1}, "x"), [[[2, 0, 1]]]
    )
    np.testing.assert_array_equal(io.map_label_codes(np.array([[[0, 2**30]]]), {2**30: 1}, "x"), [[[0, 1]]])


def test_write_nifti_int64_is_stored_as_int32(tmp_path):
    array = np.arange(8, dtype=np.int64).reshape(2, 2, 2)
    io.write_nifti(str(tmp_path / "sub" / "p.nii.gz"), array, np.eye(4))
    img = nib.load(str(tmp_path / "sub" / "p.nii.gz"))
    assert img.get_data_dtype() == np.int32
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.arange(8).reshape(2, 2, 2))


def test_singular_affine_is_rejected_naming_the_file(tmp_path):
    path = str(tmp_path / "flat.nii.gz")
    img = nib.Nifti1Image(np.ones((4, 5, 6), np.float32), _affine())
    img.header["srow_z"] = [0, 0, 0, 5]  # sform with a zero third column (a zero voxel size)
    img.update_header = lambda: None  # nibabel would re-derive the header from a valid affine
    nib.save(img, path)
    assert np.linalg.matrix_rank(nib.load(path).affine[:3, :3]) == 2
    for load in (io.load_image, io.load_label):
        with pytest.raises(io.DataError, match=r"flat\.nii\.gz: affine is singular \(a zero voxel size"):
            load(path)


def test_unreadable_paths_say_what_they_are(tmp_path, monkeypatch):
    loop, other = tmp_path / "x.nii.gz", tmp_path / "y.nii.gz"
    os.symlink(other, loop)
    os.symlink(loop, other)
    with pytest.raises(io.DataError, match=r"x\.nii\.gz: image is a symlink loop"):
        io.load_image(str(loop))
    dangling = tmp_path / "d.nii.gz"
    os.symlink(tmp_path / "gone.nii.gz", dangling)
    with pytest.raises(io.DataError, match=r"d\.nii\.gz: label is a dangling symlink \(it points to .*gone"):
        io.load_label(str(dangling))
    (tmp_path / "img.nii.gz").mkdir()
    with pytest.raises(io.DataError, match=r"img\.nii\.gz: image is a directory, not a file"):
        io.load_image(str(tmp_path / "img.nii.gz"))
    # Tests run as root, who reads chmod-000 files: deny the read the way the OS would for a user.
    locked = str(tmp_path / "locked.nii.gz")
    io.write_nifti(locked, np.ones((2, 2, 2), np.float32), np.eye(4))
    real_open = builtins.open

    def deny(file, *args, **kwargs):
        if os.fspath(file) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(io.DataError, match=r"locked\.nii\.gz: permission denied \(cannot read the image\)"):
        io.load_image(locked)
