"""Metrics vs MONAI 1.1.0 golden Dice, brute-force surface distances, and MONAI 1.6.1 (installed)."""

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

from cinjax import metrics

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "monai110_losses.npz")  # MONAI 1.1.0 values
SPACING = (2.0, 0.75, 1.25)


@pytest.fixture(scope="module")
def golden():
    d = np.load(GOLDEN)
    pred = d["logits"].argmax(axis=1)  # (B, D, H, W)
    labels = d["labels"][:, 0].astype(np.int64)
    return d, pred, labels


# ------------------------------------------------------------------------------------------- Dice


def test_dice_matches_monai110_golden(golden):
    d, pred, labels = golden
    per_sample = np.stack([metrics.dice_per_class(p, g, 8) for p, g in zip(pred, labels)])
    np.testing.assert_allclose(per_sample, d["dice_metric_no_bg_per_sample"], rtol=1e-6)  # NaN == NaN
    not_nans = (~np.isnan(per_sample)).sum(0)
    np.testing.assert_array_equal(not_nans, d["dice_metric_no_bg_not_nans"])
    mean_batch = np.nanmean(per_sample, axis=0)
    np.testing.assert_allclose(mean_batch, d["dice_metric_no_bg_mean_batch"], rtol=1e-6)


def test_dice_known_boxes_and_empty_conventions():
    label = np.zeros((8, 8, 8), np.int64)
    pred = np.zeros_like(label)
    label[1:5, 1:5, 1:5] = 1  # 64 voxels
    pred[1:5, 1:5, 1:3] = 1  # 32 voxels inside
    pred[6, 6, 6] = 2  # class 2 predicted, absent from GT
    dice = metrics.dice_per_class(pred, label, 4)
    assert dice[0] == pytest.approx(2 * 32 / 96)
    assert np.isnan(dice[1]) and np.isnan(dice[2])  # GT empty -> NaN, whatever the prediction
    strict = metrics.dice_per_class(pred, label, 4, ignore_empty=False)
    assert strict[1] == 0.0 and strict[2] == 1.0  # GT empty: FP -> 0, both empty -> 1
    assert metrics.dice_per_class(pred, label, 4, include_background=True).shape == (4,)
    assert metrics.whole_foreground_dice(pred, label) == pytest.approx(2 * 32 / (64 + 33))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        metrics.dice_per_class(pred, label, 2)


# ------------------------------------------------------------------------------- surface distances


def _brute_force(pred_mask, gt_mask, spacing):
    """Definition-level reference: 6-neighbour boundary (outside counts as background), all pairs."""

    def boundary(m):
        padded = np.pad(m, 1)
        inner = np.ones_like(m)
        for axis in range(3):
            for shift in (-1, 1):
                inner &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
        return m & ~inner

    bp = np.argwhere(boundary(pred_mask)) * np.asarray(spacing)
    bg = np.argwhere(boundary(gt_mask)) * np.asarray(spacing)
    dist = np.sqrt(((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1))
    d_pg, d_gp = dist.min(1), dist.min(0)
    hd95 = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    assd = np.concatenate([d_pg, d_gp]).mean()
    return hd95, assd


def _ellipsoid(shape, center_mm, radii_mm, spacing):
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    return (((grid - np.asarray(center_mm)) / np.asarray(radii_mm)) ** 2).sum(-1) <= 1.0


@pytest.fixture(scope="module")
def shape_pairs():
    shape = (14, 30, 20)
    gt = _ellipsoid(shape, (13.0, 11.0, 12.0), (9.0, 7.0, 8.0), SPACING)
    pred = _ellipsoid(shape, (15.0, 10.0, 11.0), (8.0, 8.5, 6.0), SPACING)
    box_gt = np.zeros(shape, bool)
    box_gt[0:6, 3:20, 0:9] = True  # touches the volume border on two axes
    box_pred = np.zeros(shape, bool)
    box_pred[2:9, 5:26, 2:12] = True
    return [(pred, gt), (box_pred, box_gt), (pred, box_gt)]


def test_distances_match_brute_force(shape_pairs):
    for pred, gt in shape_pairs:
        hd95, assd = _brute_force(pred, gt, SPACING)
        assert metrics.hausdorff_distance(pred, gt, SPACING) == pytest.approx(hd95, rel=1e-9)
        assert metrics.average_surface_distance(pred, gt, SPACING) == pytest.approx(assd, rel=1e-9)
        assert hd95 > 0 and assd > 0


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_distances_match_installed_monai(shape_pairs):
    for pred, gt in shape_pairs:
        y_pred = torch.tensor(pred[None, None], dtype=torch.float32)
        y = torch.tensor(gt[None, None], dtype=torch.float32)
        hd95 = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=95, spacing=list(SPACING)
        )
        hd = compute_hausdorff_distance(y_pred, y, include_background=True, spacing=list(SPACING))
        assd = compute_average_surface_distance(
            y_pred, y, include_background=True, symmetric=True, spacing=list(SPACING)
        )
        assert metrics.hausdorff_distance(pred, gt, SPACING) == pytest.approx(float(hd95), rel=1e-5)
        assert metrics.hausdorff_distance(pred, gt, SPACING, percentile=None) == pytest.approx(
            float(hd), rel=1e-5
        )
        assert metrics.average_surface_distance(pred, gt, SPACING) == pytest.approx(float(assd), rel=1e-5)


def test_single_voxels_known_distance_in_mm():
    a = np.zeros((6, 6, 6), bool)
    b = np.zeros((6, 6, 6), bool)
    a[1, 1, 1] = True
    b[3, 2, 1] = True
    expected = math.sqrt((2 * 2.0) ** 2 + (1 * 0.75) ** 2)
    assert metrics.hausdorff_distance(a, b, SPACING) == pytest.approx(expected)
    assert metrics.average_surface_distance(a, b, SPACING) == pytest.approx(expected)
    assert metrics.hausdorff_distance(a, a, SPACING) == 0.0
    # Isotropic spacing given as a number equals voxel units times that number.
    assert metrics.hausdorff_distance(a, b, 2.0) == pytest.approx(2.0 * math.sqrt(5))


def test_surface_is_cross_eroded_boundary():
    m = np.zeros((7, 7, 7), bool)
    m[1:6, 1:6, 1:6] = True
    s = metrics.surface_voxels(m)
    assert s.sum() == 125 - 27  # a 5^3 cube minus its 3^3 interior
    full = np.ones((3, 3, 3), bool)  # the volume border counts as background
    assert metrics.surface_voxels(full).sum() == 26


def test_empty_mask_conventions():
    z = np.zeros((5, 5, 5), bool)
    a = z.copy()
    a[1:3, 1:3, 1:3] = True
    assert math.isnan(metrics.hausdorff_distance(z, z, SPACING))
    assert math.isnan(metrics.average_surface_distance(z, z, SPACING))
    for p, g in ((a, z), (z, a)):
        assert metrics.hausdorff_distance(p, g, SPACING) == math.inf
        assert metrics.average_surface_distance(p, g, SPACING) == math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai_assd = compute_average_surface_distance(
            torch.tensor(a[None, None], dtype=torch.float32),
            torch.zeros(1, 1, 5, 5, 5),
            include_background=True,
            symmetric=True,
        )
    assert float(monai_assd) == math.inf


def test_invalid_spacing_is_explicit():
    a = np.ones((3, 3, 3), bool)
    with pytest.raises(ValueError, match="spacing"):
        metrics.hausdorff_distance(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="percentile"):
        metrics.hausdorff_distance(a, a, 1.0, percentile=120)


# ------------------------------------------------------------------------------ volumes and summary


def _volume(seed, missing=None, extra=None):
    rng = np.random.default_rng(seed)
    label = np.zeros((10, 12, 8), np.int64)
    label[1:6, 2:8, 1:6] = 1
    label[6:9, 3:10, 2:7] = 2
    pred = label.copy()
    flip = rng.random(label.shape) < 0.05
    pred[flip] = rng.integers(0, 3, size=flip.sum())
    if missing is not None:
        pred[pred == missing] = 0
    if extra is not None:
        label[label == extra] = 0
    return pred, label


def test_evaluate_volume_and_summarize():
    names = ("A", "B")
    sp = (1.5, 1.0, 0.8)
    specs = [("ct1", "CT", {}), ("ct2", "CT", {"missing": 2}), ("mr1", "MR", {"extra": 1})]
    vols = []
    for i, (key, modality, kw) in enumerate(specs):
        pred, label = _volume(i, **kw)
        v = metrics.evaluate_volume(
            pred, label, spacing=sp, class_names=names, key=key, modality_name=modality, union_name="union"
        )
        assert v["classes"]["A"]["dice"] == pytest.approx(
            metrics.dice_per_class(pred, label, 3)[0], nan_ok=True
        )
        assert v["classes"]["B"]["hd95_mm"] == pytest.approx(
            metrics.hausdorff_distance(pred == 2, label == 2, sp), nan_ok=True
        )
        assert v["union_dice"] == pytest.approx(metrics.whole_foreground_dice(pred, label))
        vols.append(v)
    assert vols[1]["classes"]["B"]["hd95_mm"] == math.inf  # class present in GT, never predicted
    assert math.isnan(vols[2]["classes"]["A"]["dice"])  # class absent from GT

    s = metrics.summarize(vols, class_names=names, union_name="union")
    assert set(s) == {"mean_dice", "modalities", "volumes"} and set(s["modalities"]) == {"CT", "MR"}
    ct = s["modalities"]["CT"]
    for key in ("mean_dice", "mean_hd95_mm", "mean_assd_mm", "union_dice", "classes"):
        assert key in ct
    b = ct["classes"]["B"]
    assert b["dice"] == pytest.approx((vols[0]["classes"]["B"]["dice"] + vols[1]["classes"]["B"]["dice"]) / 2)
    assert b["hd95_mm"] == pytest.approx(vols[0]["classes"]["B"]["hd95_mm"]) and b["hd95_n_inf"] == 1
    assert ct["mean_dice"] == pytest.approx((ct["classes"]["A"]["dice"] + b["dice"]) / 2)
    mr = s["modalities"]["MR"]
    assert math.isnan(mr["classes"]["A"]["dice"]) and mr["mean_dice"] == pytest.approx(
        mr["classes"]["B"]["dice"]
    )
    # Pooled mean: per-class mean over all volumes (NaN ignored), then over classes.
    a_all = np.nanmean([v["classes"]["A"]["dice"] for v in vols])
    b_all = np.nanmean([v["classes"]["B"]["dice"] for v in vols])
    assert s["mean_dice"] == pytest.approx((a_all + b_all) / 2)
    text = json.dumps(metrics.json_safe(s), allow_nan=False)
    back = json.loads(text)
    assert back["modalities"]["MR"]["classes"]["A"]["dice"] is None
    assert back["volumes"][1]["classes"]["B"]["hd95_mm"] == "inf"


def test_class_names_must_match_num_classes():
    pred, label = _volume(0)
    with pytest.raises(ValueError, match="class_names"):
        metrics.evaluate_volume(pred, label, spacing=1.0, num_classes=3, class_names=("A", "B", "C"))
