"""Preprocessing: RAS + resampling against nibabel/scipy and MONAI, intensity, padding, geometry
inversion, and the cache (reuse, invalidation, no partial entries)."""

import json
import logging
import multiprocessing
import os
import re
import signal
import threading
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cinjax.data import cache, geometry, io, preprocess
from cinjax.data.config import default_data_config
from cinjax.data.datalist import Entry, load_entries
from cinjax.shapes import padding_to

SHAPE = (20, 24, 16)
MINMAX = {"mode": "minmax", "window": [-175.0, 250.0], "percentiles": [0.5, 99.5]}


def _affine(codes, spacing, origin=(10.0, -20.0, 5.0), rotate=0.0, shear=0.0):
    aff = np.zeros((4, 4))
    aff[3, 3] = 1
    for i, (ax, flip) in enumerate(nib.orientations.axcodes2ornt(tuple(codes))):
        aff[int(ax), i] = flip * spacing[i]
    c, s = np.cos(rotate), np.sin(rotate)
    aff[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ aff[:3, :3]
    aff[0, 1] += shear
    aff[:3, 3] = origin
    return aff


def _volume(seed=0):
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.normal(size=SHAPE), 1.5).astype(np.float32) * 300 + 40
    label = np.zeros(SHAPE, np.uint8)
    label[4:12, 5:15, 3:9] = 1
    label[12:17, 8:20, 6:13] = 2
    label[image > np.percentile(image, 97)] = 3
    return image, label


def _write(d, name, aff, seed=0):
    image, label = _volume(seed)
    ip, lp = str(d / f"{name}_image.nii.gz"), str(d / f"{name}_label.nii.gz")
    io.write_nifti(ip, image, aff)
    io.write_nifti(lp, label, aff)
    return ip, lp


def _task(ip, lp, spacing=(1.0, 1.0, 1.0), roi=(16, 16, 16), intensity=MINMAX, split="training"):
    return preprocess.Task(
        entry=Entry(ip, lp, 0, split, "test"),
        modality_name="CT",
        needs_foreground=split == "training",
        codes={0: 0, 1: 1, 2: 2, 3: 3},
        affine_atol=1e-3,
        spacing=tuple(spacing),
        roi=tuple(roi),
        intensity=dict(intensity),
    )


# -------------------------------------------------------------------------------- geometry vs reference


@pytest.mark.parametrize("codes", ["LPS", "PIL", "ASL", "RAS", "IRP"])
def test_to_ras_matches_as_closest_canonical(codes):
    aff = _affine(codes, (0.8, 1.3, 2.0))
    arr = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    ref = nib.as_closest_canonical(nib.Nifti1Image(arr, aff))
    out, out_aff, ornt = geometry.to_ras(arr, aff)
    np.testing.assert_array_equal(out, np.asarray(ref.dataobj))
    np.testing.assert_allclose(out_aff, ref.affine, atol=1e-12)
    assert nib.aff2axcodes(out_aff) == ("R", "A", "S")
    np.testing.assert_array_equal(geometry.from_ras(out, ornt), arr)


def _scipy_reference(arr, src_aff, dst_aff, dst_shape, order):
    """Independent reference: voxel-centre mapping inv(A_src) A_dst, clamped, scipy sampling."""
    grid = np.indices(dst_shape, dtype=np.float64).reshape(3, -1)
    coords = (np.linalg.inv(src_aff) @ dst_aff @ np.vstack([grid, np.ones(grid.shape[1])]))[:3]
    coords = np.clip(coords, 0, np.array(arr.shape)[:, None] - 1)
    if order == 0:
        idx = np.rint(coords).astype(int)
        return arr[idx[0], idx[1], idx[2]].reshape(dst_shape)
    return ndimage.map_coordinates(arr.astype(np.float64), coords, order=1, mode="nearest").reshape(dst_shape)


@pytest.mark.parametrize(
    "spacing,target", [((0.8, 1.3, 2.0), (1.0, 1.0, 1.0)), ((1.7, 0.6, 1.1), (1.0, 1.5, 0.9))]
)
def test_resample_anisotropic_matches_scipy(spacing, target):
    image, label = _volume()
    aff = _affine("RAS", spacing)
    new_aff, new_shape = geometry.resampled_grid(aff, SHAPE, target)
    # MONAI Spacing (scale_extent=False): first voxel centre kept, shape spans the voxel centres.
    assert new_shape == tuple(int(round((n - 1) * s / t)) + 1 for n, s, t in zip(SHAPE, spacing, target))
    expected = np.diag([*target, 1.0])
    expected[:3, 3] = aff[:3, 3]
    np.testing.assert_allclose(new_aff, expected, atol=1e-12)
    out = geometry.resample(image, aff, new_aff, new_shape, "linear")
    assert out.dtype == np.float32 and out.shape == new_shape
    np.testing.assert_allclose(out, _scipy_reference(image, aff, new_aff, new_shape, 1), atol=2e-5)
    lab = geometry.resample(label, aff, new_aff, new_shape, "nearest")
    assert lab.dtype == np.uint8
    np.testing.assert_array_equal(lab, _scipy_reference(label, aff, new_aff, new_shape, 0))


def test_resample_sheared_grid_matches_scipy():
    image, label = _volume()
    aff = _affine("RAS", (1.23, 0.91, 1.07), shear=0.31)  # no exact .5 ties for nearest
    new_aff, new_shape = geometry.resampled_grid(aff, SHAPE, (1.0, 1.0, 1.0))
    out = geometry.resample(image, aff, new_aff, new_shape, "linear")
    np.testing.assert_allclose(out, _scipy_reference(image, aff, new_aff, new_shape, 1), atol=2e-5)
    np.testing.assert_array_equal(
        geometry.resample(label, aff, new_aff, new_shape, "nearest"),
        _scipy_reference(label, aff, new_aff, new_shape, 0),
    )


def test_preprocess_non_ras_matches_canonical_then_scipy(tmp_path):
    aff = _affine("PIL", (1.7, 0.6, 1.1))
    ip, lp = _write(tmp_path, "v", aff)
    image, label, meta = preprocess.preprocess_volume(_task(ip, lp, roi=(8, 8, 8)))
    can = nib.as_closest_canonical(nib.load(ip))
    ras = np.asarray(can.dataobj, np.float32)
    ras_label = np.asarray(nib.as_closest_canonical(nib.load(lp)).dataobj)
    dst_aff = np.asarray(meta["resampled"]["affine"])
    dst_shape = tuple(meta["resampled"]["shape"])
    ref = _scipy_reference(ras, can.affine, dst_aff, dst_shape, 1)
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    np.testing.assert_allclose(image, ref, atol=1e-5)
    np.testing.assert_array_equal(label, _scipy_reference(ras_label, can.affine, dst_aff, dst_shape, 0))
    np.testing.assert_allclose(np.linalg.norm(dst_aff[:3, :3], axis=0), 1.0)
    assert meta["original"]["axcodes"] == ["P", "I", "L"]


@pytest.fixture(scope="module")
def monai_transforms():
    from monai import transforms as mt

    def make(target, roi):
        keys = ["image", "label"]
        return mt.Compose(
            [
                mt.LoadImaged(keys),
                mt.EnsureChannelFirstd(keys),
                mt.Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
                mt.Spacingd(keys, pixdim=target, mode=("bilinear", "nearest")),
                mt.ScaleIntensityd("image"),
                mt.SpatialPadd(keys, roi),
            ]
        )

    return make


@pytest.mark.parametrize(
    "codes,spacing,target,rotate",
    [
        ("LPS", (0.8, 1.3, 2.0), (1.0, 1.0, 1.0), 0.0),
        ("PIL", (1.7, 0.6, 1.1), (1.0, 1.5, 0.9), 0.0),
        ("ASL", (1.2, 0.9, 1.0), (1.0, 1.0, 1.0), 0.1),
        ("PLS", (1.2, 1.2, 2.0), (1.0, 1.0, 1.0), 0.0),  # 2 mm -> 1 mm: every other output plane is a tie
    ],
)
def test_matches_monai_transforms_1_to_6(tmp_path, monai_transforms, codes, spacing, target, rotate):
    ip, lp = _write(tmp_path, "v", _affine(codes, spacing, rotate=rotate))
    roi = (32, 16, 32)
    ref = monai_transforms(target, roi)({"image": ip, "label": lp})
    image, label, meta = preprocess.preprocess_volume(_task(ip, lp, spacing=target, roi=roi))
    assert image.shape == tuple(ref["image"].shape[1:])
    np.testing.assert_allclose(image, ref["image"][0].numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(meta["affine"]), ref["image"].affine.numpy(), atol=1e-9)
    # Labels agree exactly except on exact half-voxel ties, which MONAI breaks by float noise.
    mismatch = label != ref["label"][0].numpy().astype(np.uint8)
    xform = np.linalg.solve(np.asarray(meta["ras"]["affine"]), np.asarray(meta["resampled"]["affine"]))
    tie = np.zeros(label.shape, bool)
    for ax in range(3):
        c = xform[ax, ax] * (np.arange(label.shape[ax]) - meta["pad"][ax][0]) + xform[ax, 3]
        on_tie = np.isclose(c - np.floor(c), 0.5, atol=1e-9)
        tie |= on_tie.reshape([-1 if a == ax else 1 for a in range(3)])
    assert not (mismatch & ~tie).any()
    assert mismatch.mean() < 0.01


# ------------------------------------------------------------------------------------------- intensity


def test_intensity_modes():
    x = np.linspace(-1000, 1500, 101, dtype=np.float32).reshape(1, 1, -1)
    s = dict(MINMAX)
    np.testing.assert_allclose(preprocess.scale_intensity(x, s), (x + 1000) / 2500, atol=1e-7)
    s["mode"] = "window"
    np.testing.assert_allclose(
        preprocess.scale_intensity(x, s), (np.clip(x, -175, 250) + 175) / 425, atol=1e-7
    )
    s["mode"], s["percentiles"] = "percentile", [10.0, 90.0]
    lo, hi = np.percentile(x, [10, 90])
    np.testing.assert_allclose(
        preprocess.scale_intensity(x, s), (np.clip(x, lo, hi) - lo) / (hi - lo), atol=1e-6
    )
    s["mode"] = "zscore"
    z = preprocess.scale_intensity(x, s)
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5
    s["mode"] = "minmax"
    np.testing.assert_array_equal(preprocess.scale_intensity(np.full((2, 2, 2), 7.0, np.float32), s), 0)


def test_intensity_by_modality_overrides():
    cfg = default_data_config()
    cfg.intensity_by_modality = {"CT": {"mode": "window", "window": (-100.0, 300.0)}}
    assert preprocess.intensity_settings(cfg, "CT") == {
        "mode": "window",
        "window": [-100.0, 300.0],
        "percentiles": [0.5, 99.5],
    }
    assert preprocess.intensity_settings(cfg, "MR")["mode"] == "minmax"


def test_padding_is_symmetric_and_keeps_world_positions(tmp_path):
    assert padding_to((20, 24, 16), (25, 24, 19)) == ((2, 3), (0, 0), (1, 2))
    ip, lp = _write(tmp_path, "v", _affine("RAS", (1.0, 1.0, 1.0)))
    image, label, meta = preprocess.preprocess_volume(_task(ip, lp, roi=(25, 24, 19)))
    assert image.shape == (25, 24, 19) and meta["pad"] == [[2, 3], [0, 0], [1, 2]]
    assert (image[:2] == 0).all() and (image[-3:] == 0).all() and (label[:, :, -2:] == 0).all()
    src, _ = io.load_image(ip)
    src = (src - src.min()) / (src.max() - src.min())
    np.testing.assert_allclose(image[2:22, :, 1:17], src, atol=1e-6)
    # A voxel's world position is the same in the padded array (final affine) and in the source.
    np.testing.assert_allclose(
        np.asarray(meta["affine"]) @ [2, 0, 1, 1], io.load_image(ip)[1].affine @ [0, 0, 0, 1]
    )


# ----------------------------------------------------------------------------------- inverse geometry


@pytest.mark.parametrize("codes", ["PIL", "LPS", "RAS"])
def test_label_round_trips_exactly_when_spacing_unchanged(tmp_path, codes):
    spacing = (1.7, 0.6, 1.1)
    aff = _affine(codes, spacing)
    ip, lp = _write(tmp_path, "v", aff)
    ras_spacing = io.Geometry(nib.as_closest_canonical(nib.load(ip)).affine, SHAPE).spacing
    _, label, meta = preprocess.preprocess_volume(_task(ip, lp, spacing=ras_spacing, roi=(32, 32, 32)))
    meta["shape"] = list(label.shape)
    back = geometry.invert_to_original(label, meta)
    original, geom = io.load_label(lp)
    assert back.shape == SHAPE
    np.testing.assert_array_equal(back, original)
    np.testing.assert_array_equal(geometry.original_affine(meta), geom.affine)


@pytest.mark.parametrize(
    "aff", [_affine("LPS", (0.8, 1.3, 2.0)), _affine("ASL", (1.23, 0.91, 1.37), rotate=0.1)]
)  # spacings without ties
def test_inverse_of_resampled_prediction_matches_world_nearest(tmp_path, aff):
    ip, lp = _write(tmp_path, "v", aff)
    _, label, meta = preprocess.preprocess_volume(_task(ip, lp, roi=(24, 40, 36)))
    meta["shape"] = list(label.shape)
    pred = np.random.default_rng(1).integers(0, 8, size=label.shape).astype(np.uint8)
    back = geometry.invert_to_original(pred, meta)
    assert back.shape == SHAPE and back.dtype == np.uint8
    # Reference: each source voxel takes the nearest cached voxel in world space.
    orig_aff = geometry.original_affine(meta)
    v = np.indices(SHAPE).reshape(3, -1)
    world = orig_aff @ np.vstack([v, np.ones(v.shape[1])])
    idx = np.linalg.inv(np.asarray(meta["affine"])) @ world
    idx = np.clip(np.rint(idx[:3]).astype(int), 0, np.array(pred.shape)[:, None] - 1)
    np.testing.assert_array_equal(back, pred[idx[0], idx[1], idx[2]].reshape(SHAPE))
    # A label preprocessed then inverted agrees with the source except near class boundaries.
    assert (geometry.invert_to_original(label, meta) == io.load_label(lp)[0]).mean() > 0.9
    with pytest.raises(ValueError, match="prediction shape"):
        geometry.invert_to_original(pred[1:], meta)


# ---------------------------------------------------------------------------------------------- cache


def _dataset(tmp_path, n=2, **overrides):
    entries = []
    for i in range(n):
        ip, lp = _write(tmp_path, f"ct_{i}", _affine("LPS", (0.8, 1.3, 2.0)), seed=i)
        entries.append({"image": os.path.basename(ip), "label": os.path.basename(lp)})
    mr = _write(tmp_path, "mr_0", _affine("RAS", (1.0, 1.0, 1.0)), seed=9)
    doc = {"modality": 0, "training": entries[:-1], "validation": entries[-1:], "test": entries[-1:]}
    with open(tmp_path / "ct.json", "w") as f:
        json.dump(doc, f)
    with open(tmp_path / "mr.json", "w") as f:
        json.dump(
            {
                "modality": "MR",
                "training": [{"image": os.path.basename(mr[0]), "label": os.path.basename(mr[1])}],
            },
            f,
        )
    cfg = default_data_config()
    cfg.root = str(tmp_path)
    cfg.json_lists = ("ct.json", "mr.json")
    cfg.modalities = {"CT": 0, "MR": 1, "PET": 2}
    cfg.num_classes = 4
    cfg.roi = (16, 16, 16)
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.preprocess_workers = 0
    cfg.update(overrides)
    return cfg


def _entry_dirs(cfg):
    root = cfg.cache_dir
    return sorted(os.path.join(m, e) for m in os.listdir(root) for e in os.listdir(os.path.join(root, m)))


def test_prepare_records_and_reuse(tmp_path):
    cfg = _dataset(tmp_path)
    first = preprocess.prepare(cfg, ("training", "validation", "test"), progress=False)
    assert first.written == 3  # validation == test volume is cached once
    assert {s: {m: len(r) for m, r in v.items()} for s, v in first.records.items()} == {
        "training": {"CT": 1, "MR": 1, "PET": 0},
        "validation": {"CT": 1, "MR": 0, "PET": 0},
        "test": {"CT": 1, "MR": 0, "PET": 0},
    }
    assert first.records["validation"]["CT"][0] == first.records["test"]["CT"][0]
    rec = first.records["training"]["MR"][0]
    assert rec.modality == 1 and rec.has_label and rec.key == "MR/mr_0_image"
    assert [r.modality for r in first.all_records("training")] == [0, 1]
    assert first.modality_names == {0: "CT", 1: "MR", 2: "PET"} and first.num_classes == 4
    assert first.missing_training_modalities() == ["PET"]
    # Cached arrays are exactly what preprocess_volume produces.
    ct = first.records["training"]["CT"][0]
    image, label, meta = preprocess.preprocess_volume(make_task(cfg, ct))
    got_image, got_label = cache.read_volume(ct)
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_label, label)
    assert cache.read_meta(ct.path)["ornt"] == meta["ornt"]

    def meta_mtimes():
        return {d: os.stat(os.path.join(cfg.cache_dir, d, cache.META)).st_mtime_ns for d in _entry_dirs(cfg)}

    mtimes = meta_mtimes()
    second = preprocess.prepare(cfg, ("training", "validation", "test"), progress=False)
    assert second.written == 0 and second.records == first.records
    assert meta_mtimes() == mtimes


def make_task(cfg, record):
    return next(
        t
        for t in preprocess.make_tasks(cfg, load_entries(cfg), ("training",))
        if t.entry.image == cache.read_meta(record.path)["source"]["image"]
    )


def test_changed_source_or_settings_invalidate(tmp_path):
    cfg = _dataset(tmp_path, n=1)
    first = preprocess.prepare(cfg, progress=False)
    before = set(_entry_dirs(cfg))
    # Rewrite one source with different content: only that entry is rebuilt, in a new directory.
    image, label = _volume(5)
    io.write_nifti(str(tmp_path / "mr_0_image.nii.gz"), image, _affine("RAS", (1.0, 1.0, 1.0)))
    second = preprocess.prepare(cfg, progress=False)
    assert second.written == 1
    assert second.records["training"]["CT"] == first.records["training"]["CT"]
    new_mr = second.records["training"]["MR"][0]
    assert new_mr.path != first.records["training"]["MR"][0].path
    np.testing.assert_allclose(
        cache.read_volume(new_mr)[0], (image - image.min()) / (image.max() - image.min()), atol=1e-6
    )
    # Changed settings: every entry is rebuilt.
    cfg.spacing = (1.0, 1.0, 1.5)
    third = preprocess.prepare(cfg, progress=False)
    assert third.written == 2 and len(set(_entry_dirs(cfg)) - before) == 3
    cfg.intensity_by_modality = {"MR": {"mode": "zscore"}}
    assert preprocess.prepare(cfg, progress=False).written == 1


def test_content_fingerprint_ignores_mtime(tmp_path):
    cfg = _dataset(tmp_path, n=1, cache_fingerprint="content")
    preprocess.prepare(cfg, progress=False)
    path = str(tmp_path / "mr_0_image.nii.gz")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert preprocess.prepare(cfg, progress=False).written == 0
    cfg.cache_fingerprint = "stat"
    assert preprocess.prepare(cfg, progress=False).written == 2  # stat hash differs from content hash
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert preprocess.prepare(cfg, progress=False).written == 1


def test_process_pool_gives_the_same_entries(tmp_path):
    cfg = _dataset(tmp_path, preprocess_workers=2)
    pooled = preprocess.prepare(cfg, progress=False)
    assert pooled.written == 3
    cfg.preprocess_workers = 0
    again = preprocess.prepare(cfg, progress=False)
    assert again.written == 0 and again.records == pooled.records


def _chunk(record):
    return os.path.join(record.image_path, "c", "0", "0", "0")


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_cache_entry_is_reported_and_rebuilt(tmp_path, caplog, damage):
    cfg = _dataset(tmp_path, n=1)
    first = preprocess.prepare(cfg, progress=False)
    rec = first.records["training"]["MR"][0]
    image, label = cache.read_volume(rec)
    if damage == "delete":  # tensorstore would read the missing chunk as zeros
        os.remove(_chunk(rec))
    else:
        with open(_chunk(rec), "r+b") as f:
            f.truncate(100)
        with pytest.raises(io.DataError, match=re.escape(f"{rec.path}: cannot read the cached volume")):
            cache.read_volume(rec)
    assert cache.check_entry(rec.path).startswith("image.zarr/c/0/0/0")
    warnings = []
    assert preprocess.verify(cfg, progress=False, warnings=warnings) == []
    assert [w for w in warnings if w.startswith(f"{rec.path}: the cache entry of ")] != []
    with caplog.at_level(logging.WARNING, logger=preprocess.__name__):
        second = preprocess.prepare(cfg, progress=False)
    assert second.written == 1 and second.records == first.records
    assert f"{rec.path}: cache entry of " in caplog.text and "rebuilding it" in caplog.text
    got_image, got_label = cache.read_volume(rec)
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_label, label)
    assert cache.check_entry(rec.path, content=True) is None


def test_changed_cache_bytes_and_entries_without_a_file_list(tmp_path):
    cfg = _dataset(tmp_path, n=1)
    rec = preprocess.prepare(cfg, progress=False).records["training"]["MR"][0]
    with open(_chunk(rec), "r+b") as f:  # same size, other bytes: only verify's CRC-32 sees it
        f.seek(8)
        byte = f.read(1)
        f.seek(8)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert cache.check_entry(rec.path) is None
    warnings = []
    assert preprocess.verify(cfg, progress=False, warnings=warnings) == []
    assert [w for w in warnings if rec.path in w and "CRC-32 mismatch" in w] != []
    # An entry whose metadata has no file list (another writer) is not trusted either.
    meta = cache.read_meta(rec.path)
    del meta["files"]
    with open(os.path.join(rec.path, cache.META), "w") as f:
        json.dump(meta, f)
    assert preprocess.prepare(cfg, progress=False).written == 1
    assert cache.check_entry(rec.path, content=True) is None


def test_ctrl_c_cancels_the_pool_promptly():
    # A shell that started the tests in the background may have set SIGINT to "ignore".
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    start = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(preprocess.Interrupted) as err:
            preprocess._run(time.sleep, [20.0] * 4, 2, "sleep", False)  # 40 s of work on 2 workers
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert err.value.done == [] and time.perf_counter() - start < 15
    assert multiprocessing.active_children() == []
