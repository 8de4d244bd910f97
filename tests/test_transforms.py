"""Training transforms: numpy reference, MONAI parity (crop centres, flips, rot90, intensity), statistics."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.transforms import utils as mtu

from cinjax.data import cache
from cinjax.data import transforms as T

# ---------------------------------------------------------------------------------------------------
# Plain reference (written independently of the module: same documented draw order).


def reference_augment(image, label, rng, cfg):
    for axis in cfg.flip_axes:
        if rng.random() < cfg.flip_prob:
            image = image[tuple(slice(None, None, -1) if a == axis else slice(None) for a in range(3))]
            label = label[tuple(slice(None, None, -1) if a == axis else slice(None) for a in range(3))]
    if rng.random() < cfg.rot90_prob:
        k = rng.integers(1, cfg.rot90_max_k + 1)
        a, b = cfg.rot90_axes
        for _ in range(k):  # one 90° step from axis a towards axis b: swap axes, then reverse axis a
            image = np.swapaxes(image, a, b)[
                tuple(slice(None, None, -1) if i == a else slice(None) for i in range(3))
            ]
            label = np.swapaxes(label, a, b)[
                tuple(slice(None, None, -1) if i == a else slice(None) for i in range(3))
            ]
    if rng.random() < cfg.scale_intensity_prob:
        image = image * np.float32(1 + rng.uniform(-cfg.scale_intensity_factor, cfg.scale_intensity_factor))
    if rng.random() < cfg.shift_intensity_prob:
        image = image + np.float32(rng.uniform(-cfg.shift_intensity_offset, cfg.shift_intensity_offset))
    return image, label


def reference_crop_start(shape, roi, fg, bg, rng, pos, neg):
    ratio = 0.0 if len(fg) == 0 else 1.0 if len(bg) == 0 else pos / (pos + neg)
    cand = fg if rng.random() < ratio else bg
    c = np.unravel_index(cand[rng.integers(len(cand))], shape)
    # Largest valid start is shape - roi; centre c maps to c - roi // 2.
    return tuple(int(np.clip(ci - r // 2, 0, n - r)) for ci, n, r in zip(c, shape, roi))


@pytest.fixture(scope="module")
def cube():
    rng = np.random.default_rng(7)
    label = rng.integers(0, 8, (12, 12, 12)).astype(np.uint8)
    image = (np.arange(label.size, dtype=np.float32) + 1).reshape(label.shape)  # voxel id + 1
    return image, label


@pytest.mark.parametrize("seed", range(40))
def test_augment_matches_reference(cube, seed):
    cfg = T.TransformConfig(
        roi=(12, 12, 12), flip_prob=0.5, rot90_prob=0.5, scale_intensity_prob=0.5, shift_intensity_prob=0.5
    )
    image, label = cube
    got_i, got_l = T.augment(image, label, np.random.default_rng(seed), cfg)
    ref_i, ref_l = reference_augment(image, label, np.random.default_rng(seed), cfg)
    np.testing.assert_array_equal(got_l, ref_l)
    np.testing.assert_allclose(got_i, ref_i, rtol=1e-6)
    assert got_i.dtype == np.float32 and got_l.dtype == np.uint8 and got_i.flags.c_contiguous


def test_defaults_are_mi_seg():
    cfg = T.TransformConfig()
    assert cfg.roi == (96, 96, 96) and (cfg.pos, cfg.neg) == (1.0, 1.0)
    assert (cfg.flip_prob, cfg.flip_axes, cfg.rot90_prob, cfg.rot90_max_k, cfg.rot90_axes) == (
        0.2,
        (0, 1, 2),
        0.2,
        3,
        (0, 1),
    )
    assert (cfg.scale_intensity_prob, cfg.scale_intensity_factor) == (0.1, 0.1)
    assert (cfg.shift_intensity_prob, cfg.shift_intensity_offset) == (0.1, 0.1)


def test_config_validation_and_mapping():
    with pytest.raises(ValueError, match="swap ROI sizes"):
        T.TransformConfig(roi=(32, 48, 32))
    assert T.TransformConfig(roi=(32, 48, 32), rot90_prob=0.0).roi == (32, 48, 32)
    assert T.TransformConfig(roi=(48, 48, 32)).roi == (48, 48, 32)  # rot90 plane (0, 1) is square
    with pytest.raises(ValueError, match="Unknown transform settings"):
        T.TransformConfig.from_mapping({"roi": [16, 16, 16], "flip": 0.1})
    cfg = T.TransformConfig.from_mapping({"roi": [16, 16, 16], "flip_prob": 0.0})
    assert cfg.roi == (16, 16, 16) and cfg.flip_prob == 0.0


def test_alignment_and_integer_labels_after_every_transform(cube):
    """The image holds voxel ids, so every output voxel says where it came from; labels must follow."""
    image, label = cube
    cfg = T.TransformConfig(
        roi=(12, 12, 12), flip_prob=0.5, rot90_prob=0.7, scale_intensity_prob=0.0, shift_intensity_prob=0.0
    )
    for seed in range(30):
        out_i, out_l = T.augment(image, label, np.random.default_rng(seed), cfg)
        source = out_i.astype(np.int64) - 1
        np.testing.assert_array_equal(np.sort(source.ravel()), np.arange(label.size))  # a permutation
        np.testing.assert_array_equal(out_l, label.reshape(-1)[source])
        assert np.issubdtype(out_l.dtype, np.integer)


# ---------------------------------------------------------------------------------------------------
# MONAI parity.


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flip_is_monai_flip(cube, axis):
    image, label = cube
    cfg_rng = np.random.default_rng(0)
    out, _ = T.random_flip(image, label, cfg_rng, prob=1.0, axes=(axis,))
    want = mt.Flip(spatial_axis=axis)(torch.from_numpy(image[None].copy())).numpy()[0]
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_is_monai_rotate90(cube, k):
    image, label = cube

    class FixedK:  # rng whose first draw applies the rotation and whose k draw returns k
        def random(self):
            return 0.0

        def integers(self, lo, hi):
            assert (lo, hi) == (1, 4)
            return k

    out, _ = T.random_rot90(image, label, FixedK(), prob=1.0, max_k=3, axes=(0, 1))
    want = mt.Rotate90(k=k, spatial_axes=(0, 1))(torch.from_numpy(image[None].copy())).numpy()[0]
    np.testing.assert_array_equal(out, want)


def test_intensity_is_monai(cube):
    image, _ = cube
    rng = np.random.default_rng(3)
    out = T.random_scale_intensity(image, rng, prob=1.0, factor=0.1)
    f = np.random.default_rng(3)
    f.random()
    f = f.uniform(-0.1, 0.1)
    want = mt.ScaleIntensity(minv=None, maxv=None, factor=f)(torch.from_numpy(image.copy())).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-6)
    rng = np.random.default_rng(4)
    out = T.random_shift_intensity(image, rng, prob=1.0, offset=0.1)
    o = np.random.default_rng(4)
    o.random()
    o = o.uniform(-0.1, 0.1)
    want = mt.ShiftIntensity(offset=o)(torch.from_numpy(image.copy())).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-6)


def test_crop_centre_correction_matches_monai():
    rng = np.random.default_rng(0)
    cases = 0
    for shape, roi in [
        ((20, 20, 20), (8, 8, 8)),
        ((17, 23, 9), (7, 8, 9)),
        ((16, 16, 16), (16, 16, 16)),
        ((33, 12, 40), (5, 12, 31)),
        ((9, 9, 9), (1, 2, 3)),
    ]:
        centres = [tuple(rng.integers(0, s) for s in shape) for _ in range(25)]
        centres += [(0, 0, 0), tuple(s - 1 for s in shape)]
        for c in centres:
            want_centre = mtu.correct_crop_centers(list(c), roi, shape)
            want = tuple(int(w) - r // 2 for w, r in zip(want_centre, roi))
            assert T.crop_start_from_center(c, shape, roi) == want, (shape, roi, c)
            cases += 1
    assert cases == 5 * 27


@pytest.mark.parametrize("use_fg", [True, False])
def test_sample_crop_start_matches_monai_generate(use_fg):
    """With one candidate per list and the ratio forced, MONAI's generator is deterministic."""
    shape, roi = (30, 21, 14), (10, 10, 9)
    rng = np.random.default_rng(1)
    for _ in range(20):
        fg = np.array([rng.integers(np.prod(shape))])
        bg = np.array([rng.integers(np.prod(shape))])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (centre,) = mtu.generate_pos_neg_label_crop_centers(
                roi, 1, 1.0 if use_fg else 0.0, shape, fg, bg, np.random.RandomState(0)
            )
        want = tuple(int(c) - r // 2 for c, r in zip(centre, roi))
        got = T.sample_crop_start(
            shape,
            roi,
            fg,
            bg,
            np.random.default_rng(0),
            pos=1.0 if use_fg else 0.0,
            neg=0.0 if use_fg else 1.0,
        )
        assert got == want


def test_sample_crop_start_matches_reference_and_stays_inside():
    rng = np.random.default_rng(5)
    for trial in range(60):
        shape = tuple(int(s) for s in rng.integers(8, 30, 3))
        roi = tuple(int(rng.integers(1, s + 1)) for s in shape)
        n = int(np.prod(shape))
        fg = np.sort(rng.choice(n, size=int(rng.integers(0, 20)), replace=False))
        bg = np.sort(rng.choice(n, size=int(rng.integers(1 if len(fg) == 0 else 0, 20)), replace=False))
        pos, neg = float(rng.integers(0, 3)), float(rng.integers(1, 3))
        got = T.sample_crop_start(shape, roi, fg, bg, np.random.default_rng(trial), pos, neg)
        want = reference_crop_start(shape, roi, fg, bg, np.random.default_rng(trial), pos, neg)
        assert got == want
        assert all(0 <= s and s + r <= n for s, r, n in zip(got, roi, shape))


def test_crop_errors():
    with pytest.raises(ValueError, match="larger than the volume"):
        T.sample_crop_start((8, 8, 8), (9, 8, 8), np.array([0]), np.array([1]), np.random.default_rng(0))
    with pytest.raises(ValueError, match="No crop-centre candidates"):
        T.sample_crop_start(
            (8, 8, 8), (4, 4, 4), np.array([], np.int64), np.array([], np.int64), np.random.default_rng(0)
        )


@pytest.mark.parametrize("pos,neg", [(1, 1), (1, 3)])
def test_pos_neg_rate(pos, neg):
    """Foreground sits at z < 4, background candidates at z >= 40: crops contain fg iff centred on it."""
    shape, roi = (16, 16, 120), (16, 16, 16)
    label = np.zeros(shape, np.uint8)
    label[5:9, 5:9, :4] = 3
    image = np.zeros(shape, np.float32)
    image[:, :, 40:] = 1.0
    fg = np.flatnonzero(label.ravel() > 0)
    bg = np.flatnonzero((label.ravel() == 0) & (image.ravel() > 0))
    rng = np.random.default_rng(11)
    draws = 400
    hits = 0
    for _ in range(draws):
        s = T.sample_crop_start(shape, roi, fg, bg, rng, pos, neg)
        hits += bool(label[s[0] : s[0] + 16, s[1] : s[1] + 16, s[2] : s[2] + 16].any())
    p = pos / (pos + neg)
    sd = np.sqrt(p * (1 - p) / draws)
    assert abs(hits / draws - p) < 4 * sd, (hits, draws, p)


# ---------------------------------------------------------------------------------------------------
# train_sample through the cache.


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    rng = np.random.default_rng(2)
    shape = (20, 24, 18)
    label = np.zeros(shape, np.uint8)
    label[6:12, 8:14, 5:9] = rng.integers(1, 8, (6, 6, 4))
    image = (np.arange(label.size, dtype=np.float32) + 1).reshape(shape)
    image[:2] = 0.0  # not a background candidate
    path = str(tmp_path_factory.mktemp("cache") / "vol")
    return cache.write_entry(path, key="vol", modality=1, image=image, label=label, meta={}), image, label


def test_train_sample_shapes_dtypes_and_alignment(record):
    rec, image, label = record
    cfg = T.TransformConfig(
        roi=(8, 8, 8), flip_prob=0.5, rot90_prob=0.5, scale_intensity_prob=0.0, shift_intensity_prob=0.0
    )
    fg_hits = 0
    for seed in range(40):
        out = T.train_sample(rec, np.random.default_rng(seed), cfg)
        assert out["image"].shape == (8, 8, 8, 1) and out["image"].dtype == np.float32
        assert out["label"].shape == (8, 8, 8) and out["label"].dtype == np.uint8
        assert out["modality"].shape == () and out["modality"].dtype == np.int32 and out["modality"] == 1
        source = out["image"][..., 0].astype(np.int64) - 1
        inside = source >= 0  # voxels of the zeroed slab carry no id
        np.testing.assert_array_equal(out["label"][inside], label.reshape(-1)[source[inside]])
        ids = np.unravel_index(source[inside], image.shape)
        extent = [int(i.max() - i.min()) + 1 for i in ids]
        assert all(e <= 8 for e in extent)  # one 8^3 box of the volume
        fg_hits += int(out["label"].any())
    assert fg_hits >= 15  # about half the crops are centred on foreground


def test_train_sample_is_seeded_and_matches_manual_pipeline(record):
    rec, image, label = record
    cfg = T.TransformConfig(
        roi=(8, 8, 8), flip_prob=0.5, rot90_prob=0.5, scale_intensity_prob=0.5, shift_intensity_prob=0.5
    )
    fg, bg = cache.load_candidates(rec)
    for seed in range(10):
        out = T.train_sample(rec, np.random.default_rng(seed), cfg)
        again = T.train_sample(rec, np.random.default_rng(seed), cfg)
        for k in out:
            np.testing.assert_array_equal(out[k], again[k])
        rng = np.random.default_rng(seed)
        s = reference_crop_start(image.shape, cfg.roi, fg, bg, rng, cfg.pos, cfg.neg)
        box = tuple(slice(a, a + 8) for a in s)
        ref_i, ref_l = reference_augment(image[box], label[box], rng, cfg)
        np.testing.assert_allclose(out["image"][..., 0], ref_i, rtol=1e-6)
        np.testing.assert_array_equal(out["label"], ref_l)


def test_train_sample_needs_label(tmp_path):
    rec = cache.write_entry(
        str(tmp_path / "u"), key="u", modality=0, image=np.ones((8, 8, 8), np.float32), label=None, meta={}
    )
    with pytest.raises(ValueError, match="needs a label"):
        T.train_sample(rec, np.random.default_rng(0), T.TransformConfig(roi=(8, 8, 8)))


def test_config_is_picklable_and_frozen():
    import pickle

    cfg = T.TransformConfig(roi=(16, 16, 16))
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.flip_prob = 0.5
