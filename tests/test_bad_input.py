"""Bad inputs fail early with errors naming the file; verify lists every problem at once."""

import gzip
import json
import os
import re
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

from cinjax.data import io, preprocess
from cinjax.data.config import default_data_config
from cinjax.data.datalist import Entry
from cinjax.data.io import DataError

SHAPE = (20, 24, 16)
AFFINE = np.diag([0.8, 1.3, 2.0, 1.0])
CODES = {0: 0, 500: 1, 600: 2}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pair(d, name="v", image=None, label=None, label_affine=AFFINE):
    rng = np.random.default_rng(0)
    if image is None:
        image = rng.normal(size=SHAPE).astype(np.float32)
    if label is None:
        label = np.zeros(SHAPE, np.uint16)
        label[5:10, 6:12, 4:8] = 500
        label[12:15, 6:12, 4:8] = 600
    ip, lp = str(d / f"{name}_image.nii.gz"), str(d / f"{name}_label.nii.gz")
    io.write_nifti(ip, image, AFFINE)
    io.write_nifti(lp, label, label_affine)
    return ip, lp


def _task(ip, lp, split="training"):
    return preprocess.Task(
        entry=Entry(ip, lp, 0, split, "test"),
        modality_name="CT",
        needs_foreground=split == "training",
        codes=CODES,
        affine_atol=1e-3,
        spacing=(1.0, 1.0, 1.0),
        roi=(16, 16, 16),
        intensity={"mode": "minmax", "window": [0, 1], "percentiles": [1, 99]},
    )


def _problems(ip, lp, split="training"):
    return preprocess.check_volume(_task(ip, lp, split))


def test_good_pair_has_no_problems(tmp_path):
    assert _problems(*_pair(tmp_path)) == []


def test_missing_file(tmp_path):
    ip, lp = _pair(tmp_path)
    os.remove(ip)
    (msg,) = _problems(ip, lp)
    assert msg.startswith(ip) and "image file does not exist" in msg
    with pytest.raises(DataError, match="label file does not exist"):
        io.load_label(str(tmp_path / "nope.nii.gz"))


def test_corrupt_file(tmp_path):
    ip, lp = _pair(tmp_path)
    with open(ip, "wb") as f:
        f.write(gzip.compress(b"this is not a nifti header" * 20))
    (msg,) = _problems(ip, lp)
    assert msg.startswith(ip) and "cannot read the image as NIfTI" in msg


def test_truncated_file(tmp_path):
    ip, lp = _pair(tmp_path)
    data = open(ip, "rb").read()
    with open(ip, "wb") as f:
        f.write(data[: len(data) // 2])  # header intact, voxel data cut
    (msg,) = _problems(ip, lp)
    assert msg.startswith(ip) and "voxel data is corrupt or truncated" in msg
    data = open(lp, "rb").read()
    with open(lp, "wb") as f:
        f.write(data[:40])  # header cut
    with pytest.raises(DataError, match="cannot read the label as NIfTI"):
        io.load_label(lp)


def test_4d_image(tmp_path):
    ip, lp = _pair(tmp_path)
    nib.save(nib.Nifti1Image(np.zeros(SHAPE + (2,), np.float32), AFFINE), ip)
    (msg,) = _problems(ip, lp)
    assert msg.startswith(ip) and "shape (20, 24, 16, 2); expected a 3D volume" in msg


def test_shape_mismatch(tmp_path):
    ip, lp = _pair(tmp_path, label=np.zeros((20, 24, 15), np.uint8))
    (msg,) = _problems(ip, lp, "validation")
    assert msg.startswith(lp) and "(20, 24, 15) does not match image shape (20, 24, 16)" in msg and ip in msg


def test_affine_mismatch_beyond_tolerance(tmp_path):
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    ip, lp = _pair(tmp_path, label_affine=shifted)
    (msg,) = _problems(ip, lp)
    assert msg.startswith(lp) and "affine differs" in msg and ip in msg
    within = AFFINE.copy()
    within[0, 3] += 1e-4
    assert _problems(*_pair(tmp_path, "w", label_affine=within)) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_voxels(tmp_path, bad):
    image = np.ones(SHAPE, np.float32)
    image[3, 4, 5] = bad
    ip, lp = _pair(tmp_path, image=image)
    (msg,) = _problems(ip, lp)
    assert msg.startswith(ip) and "1 NaN/inf voxels" in msg


def test_label_values_outside_code_map(tmp_path):
    label = np.zeros(SHAPE, np.uint16)
    label[2:4, 2:4, 2:4] = 500
    label[8, 8, 8] = 421
    ip, lp = _pair(tmp_path, label=label)
    (msg,) = _problems(ip, lp)
    assert msg.startswith(lp) and "label values [421] are not in the label code map" in msg


def test_non_integer_label(tmp_path):
    ip, lp = _pair(tmp_path, label=np.full(SHAPE, 0.5, np.float32))
    (msg,) = _problems(ip, lp)
    assert msg.startswith(lp) and "non-integer" in msg


def test_empty_label_only_rejected_for_training(tmp_path):
    ip, lp = _pair(tmp_path, label=np.zeros(SHAPE, np.uint8))
    (msg,) = _problems(ip, lp, "training")
    assert msg.startswith(lp) and "no foreground" in msg
    assert _problems(ip, lp, "validation") == []


def test_several_problems_of_one_volume_are_all_reported(tmp_path):
    image = np.ones(SHAPE, np.float32)
    image[0, 0, 0] = np.nan
    label = np.zeros(SHAPE, np.uint16)
    label[1, 1, 1] = 7
    ip, lp = _pair(tmp_path, image=image, label=label)
    msgs = _problems(ip, lp)
    assert len(msgs) == 2 and msgs[0].startswith(ip) and msgs[1].startswith(lp)


def _dataset(tmp_path, entries, json_name="ds.json", validation=()):
    with open(tmp_path / json_name, "w") as f:
        json.dump({"modality": 0, "training": entries, "validation": list(validation), "test": []}, f)
    cfg = default_data_config()
    cfg.root = str(tmp_path)
    cfg.json_lists = (json_name,)
    cfg.label_codes = {500: 1, 600: 2}
    cfg.roi = (16, 16, 16)
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.preprocess_workers = 0
    return cfg


def test_bad_volume_raises_before_training_and_leaves_no_cache_entry(tmp_path):
    _pair(tmp_path, "good")
    bad = np.ones(SHAPE, np.float32)
    bad[1, 2, 3] = np.nan
    _pair(tmp_path, "bad", image=bad)
    cfg = _dataset(
        tmp_path, [{"image": f"{n}_image.nii.gz", "label": f"{n}_label.nii.gz"} for n in ("good", "bad")]
    )
    with pytest.raises(DataError, match=r"(?s)1 bad volume.*bad_image\.nii\.gz: image has 1 NaN/inf") as err:
        preprocess.prepare(cfg, progress=False)
    assert "good_image" not in str(err.value)
    cached = os.listdir(tmp_path / "cache" / "CT")
    assert len(cached) == 1 and cached[0].startswith("good_image-")  # no entry (or temp dir) for 'bad'


def _entries(*names):
    return [{"image": f"{n}_image.nii.gz", "label": f"{n}_label.nii.gz"} for n in names]


def _singular(path):
    """Rewrite a NIfTI file with a sform whose third column is zero (nibabel refuses to write one)."""
    img = nib.load(path)
    img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
    img.header["srow_z"] = [0, 0, 0, 5]
    img.update_header = lambda: None  # keep the edited header as it is
    nib.save(img, path)


def test_singular_affine_is_reported_by_verify_and_prepare(tmp_path):
    ip, lp = _pair(tmp_path, "flat")
    _singular(ip)
    (msg,) = _problems(ip, lp)
    assert msg.startswith(f"{ip}: affine is singular (a zero voxel size / not invertible)")
    cfg = _dataset(tmp_path, _entries("flat"))
    assert preprocess.verify(cfg, progress=False) == [msg]
    with pytest.raises(DataError, match=re.escape(f"{ip}: affine is singular")):
        preprocess.prepare(cfg, progress=False)


def test_no_training_volumes(tmp_path):
    _pair(tmp_path, "v")
    cfg = _dataset(tmp_path, [], validation=_entries("v"))
    msg = "the training split has no volumes (data.json_lists=('ds.json',))"
    assert [p for p in preprocess.verify(cfg, progress=False) if msg in p] != []
    with pytest.raises(DataError, match=re.escape(msg)):
        preprocess.prepare(cfg, progress=False)
    # Without the training split (e.g. evaluation only) an empty training list is fine.
    assert preprocess.verify(cfg, ("validation",), progress=False) == []
    assert preprocess.prepare(cfg, ("validation",), progress=False).written == 1


def test_paths_that_are_not_files_say_what_they_are(tmp_path):
    _pair(tmp_path, "good")
    os.symlink(tmp_path / "b_image.nii.gz", tmp_path / "a_image.nii.gz")
    os.symlink(tmp_path / "a_image.nii.gz", tmp_path / "b_image.nii.gz")
    (tmp_path / "dir_image.nii.gz").mkdir()
    entries = [dict(e, label="good_label.nii.gz") for e in _entries("a", "dir")]
    # The content fingerprint opens the sources: a directory must not crash it either.
    cfg = _dataset(tmp_path, entries, "bad.json")
    cfg.cache_fingerprint = "content"
    problems = preprocess.verify(cfg, progress=False)
    assert problems == [
        f"{tmp_path}/a_image.nii.gz: image is a symlink loop (its links point back to each other, never "
        "to a file). Point the link at the real file.",
        f"{tmp_path}/dir_image.nii.gz: image is a directory, not a file. Point the datalist entry at the "
        "NIfTI file (.nii / .nii.gz) itself.",
    ]
    with pytest.raises(DataError, match=r"(?s)2 bad volume.*symlink loop.*is a directory, not a file"):
        preprocess.prepare(cfg, progress=False)


def test_constant_image_and_empty_validation_label(tmp_path):
    ip, lp = _pair(tmp_path, "flat", image=np.full(SHAPE, 3.0, np.float32))
    (msg,) = _problems(ip, lp, "training")
    assert msg.startswith(f"{ip}: image is constant (every voxel = 3); nothing to learn from")
    warnings = []
    assert preprocess.check_volume(_task(ip, lp, "validation"), warnings) == []
    assert len(warnings) == 1 and warnings[0].startswith(f"{ip}: image is constant (every voxel = 3)")
    ip, lp = _pair(tmp_path, "bg", label=np.zeros(SHAPE, np.uint8))
    warnings = []
    assert preprocess.check_volume(_task(ip, lp, "validation"), warnings) == []
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{lp}: validation label has no foreground: its Dice will be NaN")


def _write_config(tmp_path, cfg):
    path = tmp_path / "cfg.py"
    path.write_text(
        textwrap.dedent(f"""
        import ml_collections
        from cinjax.data.config import default_data_config

        def get_config():
            c = ml_collections.ConfigDict()
            c.data = default_data_config()
            c.data.update({cfg.to_dict()!r})
            return c
    """)
    )
    return str(path)


def _python(*args):
    env = dict(
        os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu"
    )
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _cli(*args):
    return _python("-m", "cinjax.data", *args)


def test_verify_cli_lists_every_problem(tmp_path):
    _pair(tmp_path, "good")
    nan_image = np.ones(SHAPE, np.float32)
    nan_image[0, 0, 0] = np.nan
    _pair(tmp_path, "nan", image=nan_image)
    _pair(tmp_path, "empty", label=np.zeros(SHAPE, np.uint8))
    entries = [
        {"image": f"{n}_image.nii.gz", "label": f"{n}_label.nii.gz"}
        for n in ("good", "nan", "empty", "missing")
    ]
    entries.append({"image": "good_image.nii.gz", "label": "good_label.nii.gz", "modality": "PET"})
    cfg = _dataset(tmp_path, entries)
    proc = _cli("verify", "--config", _write_config(tmp_path, cfg))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr
    assert "5 problem(s) found" in err
    assert "nan_image.nii.gz: image has 1 NaN/inf voxels" in err
    assert "empty_label.nii.gz: label has no foreground" in err
    assert "missing_image.nii.gz: image file does not exist" in err
    assert "missing_label.nii.gz: label file does not exist" in err
    assert "unknown modality 'PET'" in err and "CT=0, MR=1" in err
    assert "good_image.nii.gz:" not in err

    # The same dataset without the bad entries verifies clean and prepares a cache.
    cfg.update(_dataset(tmp_path, entries[:1], "ok.json").to_dict())
    config = _write_config(tmp_path, cfg)
    proc = _cli("verify", "--config", config)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr
    proc = _cli("prepare", "--config", config)
    assert proc.returncode == 0 and "1 entries written" in proc.stdout, proc.stderr


def test_verify_cli_prints_warnings_apart_and_exits_0(tmp_path):
    _pair(tmp_path, "good")
    _pair(tmp_path, "bg", label=np.zeros(SHAPE, np.uint8))
    cfg = _dataset(tmp_path, _entries("good"), validation=_entries("bg"))
    proc = _cli("verify", "--config", _write_config(tmp_path, cfg))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 warning(s):\n- " in proc.stderr and "problem" not in proc.stderr
    assert "bg_label.nii.gz: validation label has no foreground: its Dice will be NaN" in proc.stderr
    assert proc.stdout.startswith("OK: ") and "1 warning(s) above" in proc.stdout


def test_ctrl_c_during_prepare_stops_with_one_line(tmp_path):
    _pair(tmp_path, "a")
    _pair(tmp_path, "b")
    _pair(tmp_path, "c")
    cfg = _dataset(tmp_path, _entries("a", "b", "c"))
    # A real SIGINT while the second volume is prepared (in this process: --workers=0).
    script = textwrap.dedent("""
        import signal
        from absl import app
        from cinjax.data import __main__ as cli, preprocess

        # A shell that started this job in the background may have set SIGINT to "ignore".
        signal.signal(signal.SIGINT, signal.default_int_handler)
        real, calls = preprocess._prepare_one, []

        def prepare_one(args):
            calls.append(1)
            if len(calls) == 2:
                signal.raise_signal(signal.SIGINT)
            return real(args)

        preprocess._prepare_one = prepare_one
        app.run(cli.main)
    """)
    proc = _python("-c", script, "prepare", "--config", _write_config(tmp_path, cfg), "--workers=0")
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "interrupted" in line]
    assert lines == ["interrupted; 1 of 3 entries are cached, the rest will be prepared next time."]
    assert preprocess.prepare(cfg, progress=False).written == 2
