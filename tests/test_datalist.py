"""Datalists: MI-Seg / Decathlon JSONs read unchanged, per-entry and named modalities, MM-WHS layout."""

import json
import os

import pytest

from cinjax.data import datalist
from cinjax.data.config import default_data_config
from cinjax.data.io import DataError

MODS = {"CT": 0, "MR": 1}


def _mi_seg_json(path, modality, train_ids, val_ids, test_ids, label="label_corrected", prefix="ct"):
    """A datalist with CT_fold1.json's schema (stale num* fields included, as in MI-Seg)."""

    def item(i, with_label=True):
        d = {"image": f"{prefix}_train/{prefix}_train_{i}_image.nii.gz"}
        if with_label:
            d["label"] = f"{prefix}_train/{prefix}_train_{i}_{label}.nii.gz"
        return d

    doc = {
        "description": "MM-WHS",
        "labels": {"0": "background"},
        "licence": "x",
        "modality": modality,
        "name": "MM-WHS",
        "numTest": 4,
        "numTraining": 16,
        "numValidation": 4,
        "reference": "x",
        "release": "x",
        "tensorImageSize": "3D",
        "training": [item(i) for i in train_ids],
        "validation": [item(i) for i in val_ids],
        "test": [item(i, False) for i in test_ids],
    }
    with open(path, "w") as f:
        json.dump(doc, f)
    return doc


def test_mi_seg_json_modality_copied_and_paths_relative(tmp_path):
    _mi_seg_json(tmp_path / "CT_fold1.json", 0, [1001, 1007], [1002], [1002])
    out = datalist.read_datalist(str(tmp_path / "CT_fold1.json"), str(tmp_path), MODS)
    assert [len(out[s]) for s in datalist.SPLITS] == [2, 1, 1]
    e = out["training"][1]
    assert e.image == os.path.join(str(tmp_path), "ct_train", "ct_train_1007_image.nii.gz")
    assert e.label == os.path.join(str(tmp_path), "ct_train", "ct_train_1007_label_corrected.nii.gz")
    assert e.modality == 0 and e.split == "training" and e.name == "ct_train_1007_image"
    assert out["test"][0].label is None
    assert all(x.modality == 0 for s in datalist.SPLITS for x in out[s])


def test_empty_and_missing_splits_do_not_crash(tmp_path):
    _mi_seg_json(tmp_path / "MR_fold.json", 1, [1001, 1002], [], [], prefix="mr")
    out = datalist.read_datalist(str(tmp_path / "MR_fold.json"), None, MODS)
    assert len(out["training"]) == 2 and out["validation"] == [] and out["test"] == []
    assert out["training"][0].modality == 1
    # Default data dir: the JSON's directory.
    assert out["training"][0].image.startswith(str(tmp_path))
    with open(tmp_path / "only_train.json", "w") as f:
        json.dump({"modality": "MR", "training": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}, f)
    out = datalist.read_datalist(str(tmp_path / "only_train.json"), None, MODS)
    assert out["validation"] == [] and out["test"] == [] and out["training"][0].modality == 1


def test_per_entry_modality_by_id_and_name_overrides_file(tmp_path):
    doc = {
        "modality": 0,
        "training": [
            {"image": "a.nii.gz", "label": "al.nii.gz"},
            {"image": "b.nii.gz", "label": "bl.nii.gz", "modality": 1},
            {"image": "c.nii.gz", "label": "cl.nii.gz", "modality": "mr"},
            {"image": "d.nii.gz", "label": "dl.nii.gz", "modality": "PET"},
        ],
    }
    with open(tmp_path / "mixed.json", "w") as f:
        json.dump(doc, f)
    mods = {"CT": 0, "MR": 1, "PET": 2}
    out = datalist.read_datalist(str(tmp_path / "mixed.json"), None, mods)
    assert [e.modality for e in out["training"]] == [0, 1, 1, 2]


def test_unknown_modality_lists_known_ones(tmp_path):
    with open(tmp_path / "x.json", "w") as f:
        json.dump({"training": [{"image": "a.nii.gz", "label": "b.nii.gz", "modality": "PET"}]}, f)
    with pytest.raises(DataError, match=r"x\.json.*unknown modality 'PET'.*CT=0, MR=1"):
        datalist.read_datalist(str(tmp_path / "x.json"), None, MODS)
    with pytest.raises(DataError, match=r"modality id 5 is not configured.*CT=0, MR=1"):
        datalist.resolve_modality(5, MODS, "here")


def test_missing_modality_and_missing_training_label_are_errors(tmp_path):
    with open(tmp_path / "nomod.json", "w") as f:
        json.dump({"training": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}, f)
    with pytest.raises(DataError, match=r"nomod\.json.*no modality"):
        datalist.read_datalist(str(tmp_path / "nomod.json"), None, MODS)
    with open(tmp_path / "nolabel.json", "w") as f:
        json.dump({"modality": 0, "training": [{"image": "a.nii.gz"}]}, f)
    with pytest.raises(DataError, match=r"nolabel\.json \[training\]\[0\].*no 'label'"):
        datalist.read_datalist(str(tmp_path / "nolabel.json"), None, MODS)


def test_decathlon_dataset_json(tmp_path):
    doc = {
        "name": "Task09_Spleen",
        "modality": {"0": "CT"},
        "numTraining": 1,
        "training": [{"image": "./imagesTr/spleen_2.nii.gz", "label": "./labelsTr/spleen_2.nii.gz"}],
        "test": ["./imagesTs/spleen_1.nii.gz"],
    }
    with open(tmp_path / "dataset.json", "w") as f:
        json.dump(doc, f)
    out = datalist.read_datalist(str(tmp_path / "dataset.json"), None, MODS)
    assert out["training"][0].image == os.path.join(str(tmp_path), "imagesTr", "spleen_2.nii.gz")
    assert out["test"][0].image == os.path.join(str(tmp_path), "imagesTs", "spleen_1.nii.gz")
    assert out["test"][0].label is None and out["test"][0].modality == 0
    doc["modality"] = {"0": "FLAIR", "1": "T1w"}
    with open(tmp_path / "multi.json", "w") as f:
        json.dump(doc, f)
    with pytest.raises(DataError, match="2 channels"):
        datalist.read_datalist(str(tmp_path / "multi.json"), None, MODS)


def test_problems_are_collected_not_raised(tmp_path):
    with open(tmp_path / "bad.json", "w") as f:
        json.dump(
            {
                "modality": 0,
                "training": [
                    {"image": "a.nii.gz"},
                    {"label": "x.nii.gz"},
                    {"image": "ok.nii.gz", "label": "okl.nii.gz"},
                ],
            },
            f,
        )
    problems = []
    out = datalist.read_datalist(str(tmp_path / "bad.json"), None, MODS, problems)
    assert len(problems) == 2 and len(out["training"]) == 1
    datalist.read_datalist(str(tmp_path / "absent.json"), None, MODS, problems)
    assert "absent.json: datalist file does not exist" in problems[-1]
    (tmp_path / "broken.json").write_text("{not json")
    datalist.read_datalist(str(tmp_path / "broken.json"), None, MODS, problems)
    assert "broken.json: cannot parse" in problems[-1]


def test_label_code_maps():
    assert datalist.label_code_map("mmwhs", 8) == {
        0: 0,
        500: 1,
        600: 2,
        420: 3,
        550: 4,
        205: 5,
        820: 6,
        850: 7,
    }
    assert datalist.label_code_map("identity", 3) == {0: 0, 1: 1, 2: 2}
    assert datalist.label_code_map({"7": 1, 9: 2}, 3) == {0: 0, 7: 1, 9: 2}
    with pytest.raises(DataError, match="outside classes 0..2"):
        datalist.label_code_map({7: 3}, 3)
    with pytest.raises(DataError, match="expected 'identity', 'mmwhs'"):
        datalist.label_code_map("whs", 8)


def test_named_modalities_validation():
    assert datalist.check_modalities({"T1": 0, "T2": 1, "CT": 2}) == {"T1": 0, "T2": 1, "CT": 2}
    assert datalist.check_modalities({"CT": 0}) == {"CT": 0}
    with pytest.raises(DataError, match="ids must be 0..1"):
        datalist.check_modalities({"CT": 0, "MR": 2})
    with pytest.raises(DataError, match="empty"):
        datalist.check_modalities({})


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()


def test_mmwhs_folder_layout(tmp_path):
    root = str(tmp_path)
    for m in ("ct", "mr"):
        for i in (1001, 1002, 1003):
            _touch(f"{root}/{m}_train/{m}_train_{i}_image.nii.gz")
            _touch(f"{root}/{m}_train/{m}_train_{i}_label.nii.gz")
        _touch(f"{root}/{m}_test/{m}_test_2001_image.nii.gz")
    _touch(f"{root}/ct_train/notes.txt")
    data = default_data_config()
    data.root, data.layout, data.modalities = root, "mmwhs", MODS
    data.mmwhs.validation_ids = {"CT": (1002,), "MR": (1001, 1003)}
    out = datalist.collect_entries(data)
    ct_train = [e for e in out["training"] if e.modality == 0]
    assert [e.name for e in ct_train] == ["ct_train_1001_image", "ct_train_1003_image"]
    assert ct_train[0].label == f"{root}/ct_train/ct_train_1001_label.nii.gz"
    assert [e.name for e in out["validation"]] == [
        "ct_train_1002_image",
        "mr_train_1001_image",
        "mr_train_1003_image",
    ]
    assert [(e.name, e.label, e.modality) for e in out["test"]] == [
        ("ct_test_2001_image", None, 0),
        ("mr_test_2001_image", None, 1),
    ]
    os.remove(f"{root}/mr_train/mr_train_1002_label.nii.gz")
    data.mmwhs.validation_ids = {}
    with pytest.raises(DataError, match=r"mr_train_1002_label\.nii\.gz: label file .* does not exist"):
        datalist.collect_entries(data)
    data.root = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no MM-WHS volumes found"):
        datalist.collect_entries(data)


def test_collect_entries_from_config(tmp_path):
    os.makedirs(tmp_path / "MM-WHS")
    _mi_seg_json(tmp_path / "MM-WHS" / "CT_fold1.json", 0, [1001, 1007], [1002], [1002])
    _mi_seg_json(tmp_path / "MM-WHS" / "MR.json", 1, [1001], [1002, 1009], [], prefix="mr")
    cfg = default_data_config()
    cfg.root = str(tmp_path)
    cfg.data_dirs = ("MM-WHS", "MM-WHS")
    out = datalist.load_entries(cfg)
    assert [e.modality for e in out["training"]] == [0, 0, 1]
    assert [e.modality for e in out["validation"]] == [0, 1, 1]
    assert out["training"][2].image == os.path.join(
        str(tmp_path), "MM-WHS", "mr_train", "mr_train_1001_image.nii.gz"
    )
    cfg.data_dirs = ("MM-WHS",)
    with pytest.raises(DataError, match="one data dir per datalist"):
        datalist.load_entries(cfg)
