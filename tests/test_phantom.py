"""Phantom dataset: layout, schema, label codes, geometry, determinism, distinct subjects, idempotency,
and reading it through the same datalist → preprocess → cache → transforms path as MM-WHS data."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from cinjax.data import cache, phantom, preprocess, transforms
from cinjax.data.config import default_data_config
from cinjax.data.datalist import collect_entries

MMWHS_CODES = {0, 205, 420, 500, 550, 600, 820, 850}
SMALL = dict(num_ct=3, num_mr=3, num_val=1, num_test=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("phantom"))
    return phantom.generate(root, seed=0, **SMALL)


def _load(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img


def _world_agreement(label_a, affine_a, label_b, affine_b):
    """Fraction of A's foreground voxels whose world position carries the same code in B (nearest)."""
    ijk = np.argwhere(label_a > 0)
    world = ijk @ affine_a[:3, :3].T + affine_a[:3, 3]
    v = np.rint((world - affine_b[:3, 3]) @ np.linalg.inv(affine_b[:3, :3]).T).astype(int)
    ok = np.all((v >= 0) & (v < label_b.shape), axis=1)
    got = np.zeros(len(v), label_b.dtype)
    got[ok] = label_b[tuple(v[ok].T)]
    return float(np.mean(got == label_a[tuple(ijk.T)]))


def test_layout_and_return_value(dataset):
    root = dataset["root"]
    assert dataset["generated"] and dataset["json_lists"] == ["CT.json", "MR.json"]
    assert dataset["data_dirs"] == [root, root]
    assert len(dataset["cases"]) == 6
    for m in ("ct", "mr"):
        for i in (1001, 1002, 1003):
            for part in ("image", "label"):
                assert os.path.isfile(os.path.join(root, f"{m}_train", f"{m}_train_{i}_{part}.nii.gz"))
    assert os.path.isfile(os.path.join(root, phantom.MANIFEST))


@pytest.mark.parametrize("name,modality", [("CT", 0), ("MR", 1)])
def test_datalist_follows_mi_seg_schema(dataset, name, modality):
    with open(dataset["datalists"][name]) as f:
        doc = json.load(f)
    assert set(doc) == {
        "name",
        "description",
        "labels",
        "licence",
        "reference",
        "release",
        "tensorImageSize",
        "numTraining",
        "numValidation",
        "numTest",
        "modality",
        "training",
        "validation",
        "test",
    }
    assert doc["modality"] == modality and isinstance(doc["modality"], int)
    assert doc["tensorImageSize"] == "3D" and doc["labels"]["0"] == "background"
    assert {int(k) for k in doc["labels"]} == MMWHS_CODES
    assert (doc["numTraining"], doc["numValidation"], doc["numTest"]) == (1, 1, 1)
    splits = [doc[s] for s in ("training", "validation", "test")]
    assert [len(s) for s in splits] == [1, 1, 1]
    images = [e["image"] for s in splits for e in s]
    assert len(set(images)) == 3  # test is held out from training and validation
    for entry in (e for s in splits for e in s):
        assert set(entry) == {"image", "label"}
        assert not os.path.isabs(entry["image"]) and entry["image"].startswith(f"{name.lower()}_train/")
        assert entry["label"] == entry["image"].replace("_image.", "_label.")
        assert os.path.isfile(os.path.join(dataset["root"], entry["label"]))


def test_label_codes_are_exactly_mmwhs(dataset):
    for case in dataset["cases"]:
        label, img = _load(case["label"])
        assert label.dtype == np.int16
        assert set(np.unique(label).tolist()) == MMWHS_CODES, case["label"]
        assert 0.03 < np.mean(label > 0) < 0.3  # the heart fills a decent part of the volume


def test_geometry(dataset):
    cfg = phantom.PhantomConfig()
    for case in dataset["cases"]:
        image, img = _load(case["image"])
        _, lab = _load(case["label"])
        np.testing.assert_array_equal(img.affine, lab.affine)
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        if case["modality"] == phantom.CT:
            assert image.dtype == np.int16 and image.min() >= -1024
            assert img.shape == cfg.ct_shape and nib.aff2axcodes(img.affine) == ("R", "A", "S")
            np.testing.assert_allclose(img.header.get_zooms(), (1.6, 1.6, 2.0), rtol=1e-6)
        else:
            assert image.dtype == np.float32 and image.min() >= 0
            assert img.shape == cfg.mr_shape and nib.aff2axcodes(img.affine) == ("P", "L", "S")
            np.testing.assert_allclose(img.header.get_zooms(), (1.2, 1.2, 2.0), rtol=1e-6)


def test_deterministic_from_seed(dataset):
    cfg = phantom.PhantomConfig()
    for modality, shape, spacing, axcodes, prefix in [
        (phantom.CT, cfg.ct_shape, cfg.ct_spacing, cfg.ct_axcodes, "ct"),
        (phantom.MR, cfg.mr_shape, cfg.mr_spacing, cfg.mr_axcodes, "mr"),
    ]:
        rng = phantom.case_rng(0, modality, 1002)
        image, label, affine = phantom.render(
            phantom.sample_subject(rng), modality, shape, spacing, axcodes, rng
        )
        disk_image, img = _load(
            os.path.join(dataset["root"], f"{prefix}_train/{prefix}_train_1002_image.nii.gz")
        )
        disk_label, _ = _load(
            os.path.join(dataset["root"], f"{prefix}_train/{prefix}_train_1002_label.nii.gz")
        )
        np.testing.assert_array_equal(image, disk_image)
        np.testing.assert_array_equal(label, disk_label)
        np.testing.assert_allclose(affine, img.affine, atol=1e-5)
        rng = phantom.case_rng(1, modality, 1002)
        _, other, _ = phantom.render(phantom.sample_subject(rng), modality, shape, spacing, axcodes, rng)
        assert np.mean(other != label) > 0.01  # another seed is another subject


def test_ct_and_mr_are_different_subjects(dataset):
    """Same subject rendered on both grids agrees in world space; the dataset's CT/MR pairs do not."""
    cfg = phantom.PhantomConfig()
    by = {(c["modality"], c["id"]): c for c in dataset["cases"]}
    for case_id in (1001, 1002, 1003):
        ct_label, ct_img = _load(by[(phantom.CT, case_id)]["label"])
        mr_label, mr_img = _load(by[(phantom.MR, case_id)]["label"])
        assert _world_agreement(ct_label, ct_img.affine, mr_label, mr_img.affine) < 0.6
        rng = phantom.case_rng(0, phantom.CT, case_id)  # the CT subject, rendered as MR
        _, same, same_affine = phantom.render(
            phantom.sample_subject(rng), phantom.MR, cfg.mr_shape, cfg.mr_spacing, cfg.mr_axcodes, rng
        )
        assert _world_agreement(ct_label, ct_img.affine, same, same_affine) > 0.85


def test_structures_are_distinguishable_by_intensity(dataset):
    """Blood pools bright in both modalities; myocardium between soft tissue and blood in CT, darker
    than blood in MR; lungs dark."""
    for case in dataset["cases"]:
        image, _ = _load(case["image"])
        label, _ = _load(case["label"])
        image = image.astype(np.float32)
        blood = image[np.isin(label, [500, 600, 420, 550, 820, 850])].mean()
        myo = image[label == 205].mean()
        low, high = np.percentile(image, [5, 99])
        assert blood > myo + 0.08 * (high - low), case["image"]
        if case["modality"] == phantom.CT:
            assert 50 < myo < 200 and blood > 180
            assert np.mean(image < -500) > 0.1  # air and lungs


def test_generate_is_idempotent(dataset, tmp_path):
    again = phantom.generate(dataset["root"], seed=0, **SMALL)
    assert not again["generated"] and again["datalists"] == dataset["datalists"]
    root = str(tmp_path / "p")
    first = phantom.generate(
        root, seed=0, num_ct=3, num_mr=3, num_val=1, num_test=1, ct_shape=(24, 24, 20), mr_shape=(24, 24, 20)
    )
    stamp = os.path.getmtime(first["cases"][0]["image"])
    assert not phantom.generate(
        root, seed=0, num_ct=3, num_mr=3, num_val=1, num_test=1, ct_shape=(24, 24, 20), mr_shape=(24, 24, 20)
    )["generated"]
    assert os.path.getmtime(first["cases"][0]["image"]) == stamp
    os.remove(first["cases"][-1]["label"])  # a missing file triggers regeneration
    assert phantom.generate(
        root, seed=0, num_ct=3, num_mr=3, num_val=1, num_test=1, ct_shape=(24, 24, 20), mr_shape=(24, 24, 20)
    )["generated"]
    assert os.path.isfile(first["cases"][-1]["label"])
    changed = phantom.generate(
        root, seed=1, num_ct=3, num_mr=3, num_val=1, num_test=1, ct_shape=(24, 24, 20), mr_shape=(24, 24, 20)
    )
    assert changed["generated"]
    with open(os.path.join(root, phantom.MANIFEST)) as f:
        assert json.load(f)["params"]["seed"] == 1


def test_bad_parameters():
    with pytest.raises(ValueError, match="leaves no training case"):
        phantom.PhantomConfig(num_ct=2, num_val=1, num_test=1)
    with pytest.raises(ValueError, match="mr_axcodes"):
        phantom.PhantomConfig(mr_axcodes="RRS")
    with pytest.raises(ValueError, match="wall_mm"):
        phantom.PhantomConfig(wall_mm=10.0)


def test_cli(dataset, capsys):
    phantom.main(
        ["--root", dataset["root"], "--num_ct", "3", "--num_mr", "3", "--num_val", "1", "--num_test", "1"]
    )
    assert "up to date" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# Read through the MM-WHS data path (datalist → preprocess → cache → train_sample).


@pytest.fixture(scope="module")
def prepared(dataset, tmp_path_factory):
    cfg = default_data_config()
    cfg.root = dataset["root"]
    cfg.json_lists = tuple(dataset["json_lists"])
    cfg.label_codes = "mmwhs"
    cfg.spacing = (2.0, 2.0, 2.0)
    cfg.roi = (32, 32, 32)
    cfg.cache_dir = str(tmp_path_factory.mktemp("cache"))
    cfg.preprocess_workers = 0
    return cfg, preprocess.prepare(cfg, ("training", "validation", "test"), progress=False)


def test_read_through_mmwhs_path(prepared):
    cfg, data = prepared
    assert preprocess.verify(cfg, progress=False) == []
    for split in ("training", "validation", "test"):
        assert [len(data.records[split][m]) for m in ("CT", "MR")] == [1, 1]
    ct = data.records["training"]["CT"][0]
    mr = data.records["training"]["MR"][0]
    assert (ct.modality, mr.modality) == (0, 1)
    assert ct.shape == (64, 64, 64)  # (79 * 1.6 / 2) + 1 = 64.2 -> 64 in x, y; 64 in z
    assert mr.shape == (58, 58, 56)  # PLS (96, 96, 56) at 1.2 mm -> RAS (58, 58, 56) at 2 mm
    for rec in (ct, mr):
        image, label = cache.read_volume(rec)
        assert set(np.unique(label).tolist()) == set(range(8))
        assert 0.0 <= image.min() and image.max() <= 1.0


def test_mmwhs_folder_layout_finds_the_phantom(dataset):
    data = default_data_config()
    data.root, data.layout = dataset["root"], "mmwhs"
    data.mmwhs.validation_ids = {"CT": (1002,), "MR": (1002,)}
    entries = collect_entries(data)
    assert len(entries["training"]) == 4 and len(entries["validation"]) == 2


def test_train_sample_on_phantom(prepared):
    _, data = prepared
    cfg = transforms.TransformConfig(roi=(32, 32, 32))
    rng = np.random.default_rng(0)
    fg = 0
    for rec in data.all_records("training"):
        for _ in range(10):
            out = transforms.train_sample(rec, rng, cfg)
            assert out["image"].shape == (32, 32, 32, 1) and out["label"].max() <= 7
            assert int(out["modality"]) == rec.modality
            fg += int(out["label"].any())
    assert fg >= 12  # pos-centred crops always hold foreground, many neg crops do too
