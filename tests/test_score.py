"""``python -m cinjax.evaluate --pred DIR --gt DIR``: scoring folders of NIfTI predictions.

Small synthetic label volumes (12 x 10 x 8) on a rotated, anisotropic grid; the scores must equal
``metrics.evaluate_volume`` / ``metrics.summarize`` (training-time evaluation) on the same arrays.
"""

import csv
import json
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from cinjax import evaluate, metrics
from cinjax.data import mmwhs
from cinjax.data.io import DataError, load_label

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (12, 10, 8)
SPACING = (1.5, 0.8, 2.5)
FOREGROUND = mmwhs.CLASS_NAMES[1:]
CODE_OF_CLASS = {c: code for code, c in mmwhs.CODES.items()}  # class id -> MM-WHS code


def _affine(spacing=SPACING, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A rotated (about z and x), anisotropic, translated voxel -> mm affine."""
    a, b = 0.3, -0.2
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing)
    affine[:3, 3] = np.array([-40.0, 12.5, 7.0]) + np.asarray(shift)
    return affine


def _classes(seed: int, num_classes: int = 8, shape=SHAPE) -> np.ndarray:
    """A class-id map of boxes (one per class) with some voxels flipped, so every metric is non-trivial."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, np.int64)
    for c in range(1, num_classes):
        lo = [rng.integers(0, s - 3) for s in shape]
        hi = [min(s, lo_ + rng.integers(2, 6)) for lo_, s in zip(lo, shape)]
        out[tuple(slice(a, b) for a, b in zip(lo, hi))] = c
    flip = rng.random(shape) < 0.08
    out[flip] = rng.integers(0, num_classes, int(flip.sum()))
    return out


def _to_codes(classes: np.ndarray) -> np.ndarray:
    lut = np.zeros(8, np.int64)
    for c, code in CODE_OF_CLASS.items():
        lut[c] = code
    return lut[classes].astype(np.uint16)


def _write(path, array, affine=None) -> str:
    img = nib.Nifti1Image(np.asarray(array), _affine() if affine is None else affine)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return str(path)


def _folders(tmp_path, cases, *, codes=True, num_classes=8):
    """``cases``: {name: (gt seed, pred seed)} -> (pred dir, gt dir, {name: (pred ids, gt ids)})."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, (gs, ps) in cases.items():
        g, p = _classes(gs, num_classes), _classes(ps, num_classes)
        enc = _to_codes if codes else (lambda a: a.astype(np.uint8))
        _write(gt_dir / f"{name}.nii.gz", enc(g))
        _write(pred_dir / f"{name}.nii.gz", enc(p))
        arrays[name] = (p, g)
    return str(pred_dir), str(gt_dir), arrays


def _same(a, b) -> None:
    """Nested results equal (NaN == NaN), via the strict-JSON form."""
    assert metrics.json_safe(a) == metrics.json_safe(b)


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


# ------------------------------------------------------------------------------------------ scores


def test_scores_equal_evaluate_volume_and_numpy_dice(tmp_path):
    names = ("ct_train_1001_label", "ct_train_1002_label")
    pred_dir, gt_dir, arrays = _folders(tmp_path, {n: (i, 10 + i) for i, n in enumerate(names)})
    results = evaluate.score_folder(pred_dir, gt_dir)

    spacing = load_label(os.path.join(gt_dir, f"{names[0]}.nii.gz"))[1].spacing
    assert spacing == pytest.approx(SPACING, rel=1e-6)  # from the rotated affine, not the array
    expected = [
        metrics.evaluate_volume(
            p,
            g,
            spacing=spacing,
            num_classes=8,
            class_names=FOREGROUND,
            key=n,
            modality_name="CT",
            union_name="whole_heart",
        )
        for n, (p, g) in arrays.items()
    ]
    _same(results["volumes"], expected)
    summary = metrics.summarize(expected, FOREGROUND, "whole_heart")
    _same({k: results[k] for k in summary}, summary)
    assert results["pred_dir"] == pred_dir and results["gt_dir"] == gt_dir
    assert results["unmatched"] == {"predictions": [], "ground_truths": []}

    # Independent Dice of LV (class 1) in the first volume, and the mm distances use the spacing.
    p, g = arrays[names[0]]
    dice = 2 * np.sum((p == 1) & (g == 1)) / (np.sum(p == 1) + np.sum(g == 1))
    assert results["volumes"][0]["classes"]["LV"]["dice"] == pytest.approx(dice, rel=1e-12)
    iso = metrics.evaluate_volume(p, g, spacing=1.0, class_names=FOREGROUND, union_name="whole_heart")
    assert results["volumes"][0]["classes"]["LV"]["hd95_mm"] != iso["classes"]["LV"]["hd95_mm"]
    assert set(results["modalities"]["CT"]) >= {"mean_dice", "mean_hd95_mm", "mean_assd_mm", "classes"}

    fast = evaluate.score_folder(pred_dir, gt_dir, distances=False)
    assert [v["classes"]["LV"] for v in fast["volumes"]] == [
        {"dice": v["classes"]["LV"]["dice"]} for v in results["volumes"]
    ]
    assert "mean_hd95_mm" not in fast["modalities"]["CT"]


def test_mmwhs_codes_map_to_classes(tmp_path):
    g = _classes(3)
    p = g.copy()
    p[p == 3] = 0  # LA missed entirely
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    _write(tmp_path / "g" / "case.nii", _to_codes(g))
    _write(tmp_path / "p" / "case.nii.gz", _to_codes(p))  # .nii vs .nii.gz: same name
    r = evaluate.score_folder(str(tmp_path / "p"), str(tmp_path / "g"))
    classes = r["volumes"][0]["classes"]
    assert list(classes) == list(FOREGROUND)
    assert classes["LA"]["dice"] == 0.0 and math.isinf(classes["LA"]["hd95_mm"])
    assert all(classes[n]["dice"] == 1.0 and classes[n]["hd95_mm"] == 0.0 for n in FOREGROUND if n != "LA")
    assert "whole_heart_dice" in r["modalities"]["all"]

    # MM-WHS codes scored as class ids (identity, default num classes): pointed at --label-codes mmwhs.
    with pytest.raises(DataError, match="are MM-WHS label codes.*--label-codes mmwhs"):
        evaluate.score_folder(str(tmp_path / "p"), str(tmp_path / "g"), label_codes="identity")
    # Class ids scored as MM-WHS codes: an error naming the file, pointing at --label-codes identity.
    _write(tmp_path / "p" / "case.nii.gz", p.astype(np.uint8))
    with pytest.raises(DataError, match=r"case\.nii\.gz.*not in the label code map.*--label-codes identity"):
        evaluate.score_folder(str(tmp_path / "p"), str(tmp_path / "g"))


def test_identity_codes_and_num_classes(tmp_path):
    pred_dir, gt_dir, arrays = _folders(tmp_path, {"a": (1, 2), "b": (3, 4)}, codes=False, num_classes=4)
    r = evaluate.score_folder(pred_dir, gt_dir, label_codes="identity")
    assert list(r["modalities"]["all"]["classes"]) == ["class_1", "class_2", "class_3"]
    assert "whole_foreground_dice" in r["modalities"]["all"]
    p, g = arrays["a"]
    expected = metrics.evaluate_volume(
        p, g, spacing=load_label(os.path.join(gt_dir, "a.nii.gz"))[1].spacing, num_classes=4,
        class_names=("class_1", "class_2", "class_3"), key="a", modality_name="all",
    )  # fmt: skip
    _same(r["volumes"][0], expected)

    named = evaluate.score_folder(
        pred_dir, gt_dir, label_codes="identity", num_classes=6, class_names=["w", "x", "y", "z", "e"]
    )
    assert list(named["modalities"]["all"]["classes"]) == ["w", "x", "y", "z", "e"]
    assert named["modalities"]["all"]["classes"]["e"]["n_volumes"] == 0  # absent everywhere: NaN Dice
    assert math.isnan(named["modalities"]["all"]["classes"]["e"]["dice"])
    assert (
        named["modalities"]["all"]["classes"]["x"]["dice"]
        == r["modalities"]["all"]["classes"]["class_2"]["dice"]
    )

    with pytest.raises(DataError, match="outside the classes 0..2"):
        evaluate.score_folder(pred_dir, gt_dir, label_codes="identity", num_classes=3)
    with pytest.raises(DataError, match="3 names but 6 classes"):
        evaluate.score_folder(pred_dir, gt_dir, label_codes="identity", num_classes=6, class_names="abc")


# ---------------------------------------------------------------------------------------- grouping


def test_groups_by_name_prefix_and_all(tmp_path):
    cases = {"ct_train_1001_label": (1, 2), "CT_train_1002_label": (3, 4), "mr_train_1001_label": (5, 6)}
    pred_dir, gt_dir, _ = _folders(tmp_path, cases)
    r = evaluate.score_folder(pred_dir, gt_dir, distances=False)
    assert {m: v["n_volumes"] for m, v in r["modalities"].items()} == {"CT": 2, "MR": 1}
    assert {v["key"]: v["modality_name"] for v in r["volumes"]} == {
        "CT_train_1002_label": "CT",
        "ct_train_1001_label": "CT",
        "mr_train_1001_label": "MR",
    }
    pred_dir, gt_dir, _ = _folders(tmp_path / "plain", {"case_1": (1, 2), "case_2": (3, 4)})
    assert list(evaluate.score_folder(pred_dir, gt_dir, distances=False)["modalities"]) == ["all"]


def test_three_modalities_group_by_prefix_and_datalist_ids(tmp_path):
    cases = {"ct_1_label": (1, 2), "mr_1_label": (3, 4), "mr2_1_label": (5, 6), "p_label": (7, 8)}
    pred_dir, gt_dir, _ = _folders(tmp_path, cases)
    listed = tmp_path / "MR2.json"
    listed.write_text(json.dumps({"modality": 2, "training": [{"image": "p_image.nii.gz"}]}))
    modalities = {"CT": 0, "MR": 1, "MR2": 2}
    r = evaluate.score_folder(
        pred_dir, gt_dir, datalists=[str(listed)], distances=False, modalities=modalities
    )
    assert {v["key"]: v["modality_name"] for v in r["volumes"]} == {
        "ct_1_label": "CT",
        "mr_1_label": "MR",
        "mr2_1_label": "MR2",  # the longest prefix wins
        "p_label": "MR2",  # id 2 of the datalist
    }
    default = evaluate.score_folder(pred_dir, gt_dir, datalists=[str(listed)], distances=False)
    assert {v["key"]: v["modality_name"] for v in default["volumes"]}["p_label"] == "modality_2"


def test_groups_by_datalist(tmp_path):
    cases = {"p1_label": (1, 2), "p2_label": (3, 4), "p3_label": (5, 6), "p4_label": (7, 8)}
    pred_dir, gt_dir, _ = _folders(tmp_path, cases)
    ct = {  # MI-Seg style: top-level integer modality (0 = CT), entries by label path
        "modality": 0,
        "training": [{"image": "imgs/p1_image.nii.gz", "label": "labels/p1_label.nii.gz"}],
        "validation": [
            {"image": "imgs/p2_image.nii.gz", "label": "labels/p2_label.nii.gz", "modality": "MR"}
        ],
    }
    mr = {"modality": {"0": "MR"}, "training": [], "test": ["imgs/p3_image.nii.gz"]}  # Decathlon, image only
    paths = []
    for name, doc in (("ct.json", ct), ("mr.json", mr)):
        paths.append(str(tmp_path / name))
        (tmp_path / name).write_text(json.dumps(doc))
    r = evaluate.score_folder(pred_dir, gt_dir, datalists=paths, distances=False)
    assert {v["key"]: v["modality_name"] for v in r["volumes"]} == {
        "p1_label": "CT",
        "p2_label": "MR",
        "p3_label": "MR",
        "p4_label": "all",  # in no datalist, no ct_/mr_ prefix
    }
    assert {m: v["n_volumes"] for m, v in r["modalities"].items()} == {"CT": 1, "MR": 2, "all": 1}

    (tmp_path / "clash.json").write_text(
        json.dumps({"modality": "CT", "training": [{"image": "p3_image.nii"}]})
    )
    with pytest.raises(DataError, match="p3_label is CT here but MR"):
        evaluate.score_folder(pred_dir, gt_dir, datalists=[*paths, str(tmp_path / "clash.json")])
    with pytest.raises(DataError, match="datalist file does not exist"):
        evaluate.score_folder(pred_dir, gt_dir, datalists=[str(tmp_path / "nope.json")])


# ------------------------------------------------------------------------------ matching and errors


def test_unmatched_listed_and_warned(tmp_path, capsys):
    pred_dir, gt_dir, _ = _folders(tmp_path, {"ct_train_1001_label": (1, 2)})
    _write(os.path.join(pred_dir, "ct_train_1009_label.nii.gz"), _to_codes(_classes(5)))
    _write(os.path.join(gt_dir, "ct_train_1010_label.nii.gz"), _to_codes(_classes(6)))
    _write(os.path.join(gt_dir, "ct_train_1001_image.nii.gz"), np.zeros(SHAPE, np.float32))  # an image
    _write(os.path.join(pred_dir, "mr_train_1003_image.nii.gz"), _to_codes(_classes(7)))  # named after image
    _write(os.path.join(gt_dir, "mr_train_1003_label.nii.gz"), _to_codes(_classes(8)))
    r = evaluate.score_folder(pred_dir, gt_dir, distances=False)
    assert [v["key"] for v in r["volumes"]] == ["ct_train_1001_label", "mr_train_1003_label"]
    assert r["unmatched"] == {
        "predictions": ["ct_train_1009_label.nii.gz"],
        "ground_truths": ["ct_train_1010_label.nii.gz"],
    }
    evaluate.main(["--pred", pred_dir, "--gt", gt_dir, "--no-distances"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "cinjax.evaluate: warning: 1 prediction(s) without ground truth: ct_train_1009_label.nii.gz",
        "cinjax.evaluate: warning: 1 ground truth(s) without prediction: ct_train_1010_label.nii.gz",
    ]


def _main_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cinjax.evaluate: error: "), err
    return err[0]


def test_user_errors_are_one_line(tmp_path, capsys):
    pred_dir, gt_dir, _ = _folders(tmp_path, {"a_label": (1, 2)})
    assert "does not exist or is not a directory" in _main_error(
        ["--pred", str(tmp_path / "x"), "--gt", gt_dir], capsys
    )
    os.rename(os.path.join(pred_dir, "a_label.nii.gz"), os.path.join(pred_dir, "b_label.nii.gz"))
    msg = _main_error(["--pred", pred_dir, "--gt", gt_dir], capsys)
    assert "no prediction in" in msg and "b_label.nii.gz" in msg and "a_label.nii.gz" in msg
    # The affine off by more than 1e-3 mm (same shape): both files named, and what to do.
    _write(os.path.join(pred_dir, "a_label.nii.gz"), _to_codes(_classes(2)), _affine(shift=(0.01, 0, 0)))
    msg = _main_error(["--pred", pred_dir, "--gt", gt_dir], capsys)
    assert "prediction affine differs" in msg and "a_label.nii.gz" in msg and "resample" in msg
    _write(os.path.join(pred_dir, "a_label.nii.gz"), _to_codes(_classes(2)), _affine(shift=(2e-4, 0, 0)))
    assert evaluate.score_folder(pred_dir, gt_dir, distances=False)["volumes"]  # within tolerance


def test_cli_shape_mismatch_exits_1_with_one_line(tmp_path):
    pred_dir, gt_dir, _ = _folders(tmp_path, {"ct_train_1001_label": (1, 2)})
    _write(os.path.join(pred_dir, "ct_train_1001_label.nii.gz"), _to_codes(_classes(2, shape=(12, 10, 7))))
    proc = subprocess.run(
        [sys.executable, "-m", "cinjax.evaluate", "--pred", pred_dir, "--gt", gt_dir],
        env=_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("cinjax.evaluate: error: ")
    assert "(12, 10, 7)" in lines[-1] and "(12, 10, 8)" in lines[-1]
    assert os.path.join(pred_dir, "ct_train_1001_label.nii.gz") in lines[-1]
    assert os.path.join(gt_dir, "ct_train_1001_label.nii.gz") in lines[-1]


# --------------------------------------------------------------------------------- outputs and table


def test_cli_writes_strict_json_csv_and_table(tmp_path):
    cases = {"ct_train_1001_label": (1, 2), "mr_train_1001_label": (3, 4)}
    pred_dir, gt_dir, _ = _folders(tmp_path, cases)
    # A class absent from one ground truth and predicted there: NaN Dice, inf distances.
    g = _classes(5)
    g[g == 7] = 0
    _write(os.path.join(gt_dir, "mr_train_1002_label.nii.gz"), _to_codes(g))
    _write(os.path.join(pred_dir, "mr_train_1002_label.nii.gz"), _to_codes(_classes(5)))
    out, table_csv = tmp_path / "res" / "results.json", tmp_path / "res" / "per_class.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "cinjax.evaluate", "--pred", pred_dir, "--gt", gt_dir,
         "--out", str(out), "--csv", str(table_csv)],
        env=_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    expected = evaluate.score_folder(pred_dir, gt_dir)

    def no_constants(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    written = json.loads(out.read_text(), parse_constant=no_constants)
    assert written == metrics.json_safe(expected)
    assert written["volumes"][2]["classes"]["PA"]["dice"] is None  # NaN -> null
    assert written["volumes"][2]["classes"]["PA"]["hd95_mm"] == "inf"

    rows = list(csv.DictReader(table_csv.open()))
    assert list(rows[0]) == ["modality", "class", "dice", "hd95_mm", "assd_mm", "n_volumes"]
    assert [(r["modality"], r["class"]) for r in rows] == [(m, c) for m in ("CT", "MR") for c in FOREGROUND]
    for r in rows:
        e = expected["modalities"][r["modality"]]["classes"][r["class"]]
        assert float(r["dice"]) == e["dice"] and float(r["hd95_mm"]) == e["hd95_mm"]
        assert float(r["assd_mm"]) == e["assd_mm"] and int(r["n_volumes"]) == e["n_volumes"]
    assert [r["n_volumes"] for r in rows if r["modality"] == "MR" and r["class"] == "PA"] == ["1"]

    table = evaluate.format_table(expected)
    assert table in proc.stdout
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert header == ["class"] + [f"{m} {c}" for m in ("CT", "MR") for c in ("Dice", "HD95 mm", "ASSD mm")]
    body = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines[2:11]}
    assert list(body) == [*FOREGROUND, "mean", "whole_heart"]
    ct = expected["modalities"]["CT"]
    assert body["LV"][0] == f"{ct['classes']['LV']['dice']:.4f}"
    assert body["mean"][:3] == [f"{ct[k]:.4f}" for k in ("mean_dice", "mean_hd95_mm", "mean_assd_mm")]
    assert body["whole_heart"][0] == f"{ct['whole_heart_dice']:.4f}" and body["whole_heart"][1] == ""
    mr_pa = expected["modalities"]["MR"]["classes"]["PA"]  # the infinite volume is left out of the mean
    assert body["PA"][4] == f"{mr_pa['hd95_mm']:.4f} (1 inf)" and body["PA"][5].endswith("(1 inf)")
