"""Three modalities end to end, and adding a modality to a trained model by new CIN rows.

The session fixture ``three_modalities`` (tests/conftest.py) holds a CT + MR source model and a run of
``configs/demo.py:add_mr2`` started from it through the real CLI: it adds the phantom's black-blood MR
(``MR2``) with ``finetune.trainable=new_modalities``, trains on a three-way mix in every device slice,
evaluates all three modalities and predicts their test volumes (an M = 3 run through train, eval and
predict), and it is the proof that only the new rows move.
"""

import json
import os

import jax
import ml_collections
import nibabel as nib
import numpy as np
import pytest
from jax.sharding import Mesh

from cinjax import build, checkpointing, finetune
from cinjax.data import phantom


def _params(run):
    return finetune._flat(checkpointing.restore_inference_variables(run, prefer="latest").params)


@pytest.fixture(scope="module")
def runs(three_modalities):
    return three_modalities


def test_new_modality_rows_are_the_only_parameters_that_change(runs):
    _, a, b = runs
    before, after = _params(a), _params(b)
    assert set(before) == set(after)
    tables = [k for k in after if after[k].shape != before[k].shape]
    assert tables and all(k.endswith(("/scale", "/bias")) for k in tables)
    for key, new in after.items():
        old = before[key]
        if key in tables:
            assert new.shape == (3, *old.shape[1:])
            np.testing.assert_array_equal(new[:2], old)  # CT and MR rows: bit-identical
            start = old.mean(axis=0)  # new_modality_init="mean"
            assert not np.array_equal(new[2], start), f"{key}: the MR2 row did not train"
        else:
            np.testing.assert_array_equal(new, old, err_msg=key)


def test_three_modalities_train_evaluate_and_predict(runs):
    root, _, b = runs
    results = json.load(open(os.path.join(b, "eval", "results.json")))
    assert set(results["modalities"]) == {"CT", "MR", "MR2"}
    for r in results["modalities"].values():
        assert set(r["classes"]) == {"LV", "RV", "LA", "RA", "Myo", "AA", "PA"}
    spec = json.load(open(os.path.join(b, "inference.json")))
    assert spec["modalities"] == {"CT": 0, "MR": 1, "MR2": 2}
    written = sorted(os.listdir(os.path.join(b, "predictions")))
    for name in ("ct", "mr", "mr2"):  # one test volume per modality
        assert any(f.startswith(f"{name}_train_") and f.endswith("_label.nii.gz") for f in written), written
    assert len([f for f in written if f.endswith(".nii.gz")]) == 3


def test_every_device_slice_carries_the_three_way_mix(runs):
    _, _, b = runs
    config = ml_collections.ConfigDict(json.load(open(os.path.join(b, "config.json"))))
    prepared = build.prepare_data(config.data, ("training",))
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    loader = build.make_train_loader(config, prepared, mesh)
    for _ in range(3):
        batch = next(loader)
        for shard in batch["modality"].addressable_shards:
            assert sorted(np.asarray(shard.data).tolist()) == [0, 1, 2]


def test_new_rows_start_from_the_mean_or_a_named_modality(runs):
    _, a, b = runs
    config = ml_collections.ConfigDict(json.load(open(os.path.join(b, "config.json"))))
    config.data.modalities = {"MR2": 0, "MR": 1, "CT": 2}  # ids differ from the source: rows go by name
    abstract = build.param_shapes(config, build.make_model(config))
    before = _params(a)
    for init in ("mean", "MR"):
        config.finetune.new_modality_init = init
        got = finetune._flat(finetune.load_source(config, abstract).params)
        for key, old in before.items():
            if got[key].shape != old.shape:
                np.testing.assert_array_equal(got[key][2], old[0])  # CT
                np.testing.assert_array_equal(got[key][1], old[1])  # MR
                want = old.mean(axis=0) if init == "mean" else old[1]
                np.testing.assert_allclose(got[key][0], want, rtol=0, atol=0)
    config.finetune.new_modality_init = "T1"
    with pytest.raises(finetune.FinetuneError, match="new_modality_init='T1'"):
        finetune.load_source(config, abstract)


def test_freezing_needs_a_new_modality(runs):
    _, a, b = runs
    config = ml_collections.ConfigDict(json.load(open(os.path.join(b, "config.json"))))
    config.data.modalities = {"CT": 0, "MR": 1}  # what the source has already
    abstract = build.param_shapes(config, build.make_model(config))
    with pytest.raises(finetune.FinetuneError, match="already in"):
        finetune.trainable_mask(config, abstract)


def test_phantom_black_blood_contrast_is_inverted(runs):
    root, _, _ = runs
    doc = json.load(open(os.path.join(root, "MR2.json")))
    assert doc["modality"] == phantom.MR2 == 2
    values = {}
    for name in ("mr", "mr2"):
        image = nib.load(os.path.join(root, f"{name}_train", f"{name}_train_1001_image.nii.gz")).get_fdata()
        label = nib.load(os.path.join(root, f"{name}_train", f"{name}_train_1001_label.nii.gz")).get_fdata()
        values[name] = (np.median(image[label == 500]), np.median(image[label == 205]))  # LV blood, myo
    assert values["mr"][0] > values["mr"][1] and values["mr2"][0] < values["mr2"][1]


def test_source_preprocessing_must_match(runs):
    """Frozen weights fed volumes prepared differently from their training are refused; retraining every
    parameter (trainable=all) is allowed with a warning."""
    _, a, b = runs
    config = ml_collections.ConfigDict(json.load(open(os.path.join(b, "config.json"))))
    abstract = build.param_shapes(config, build.make_model(config))
    finetune.load_source(config, abstract)  # the run's own preprocessing: accepted
    spacing = tuple(2.0 * s for s in config.data.spacing)
    for change in ("spacing", "intensity"):
        changed = ml_collections.ConfigDict(config.to_dict())
        if change == "spacing":
            changed.data.spacing = spacing
        else:
            changed.data.intensity_by_modality = {"CT": {"mode": "zscore"}}
        with pytest.raises(finetune.FinetuneError, match=r"other preprocessing: .*Set config\.data"):
            finetune.load_source(changed, abstract)
    changed.finetune.trainable = "all"
    finetune.load_source(changed, abstract)
