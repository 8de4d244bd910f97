"""Inference from a run directory: `python -m cinjax.predict`, `Predictor`, TTA, ensembles, post-processing
and `python -m cinjax.evaluate` on the predictions (the eval / predict modes: tests/test_main.py).

One tiny run is trained once (real CLI, 4 steps on 2 fake devices) on the native voxel grid
(``data.spacing=()``, not the 1 mm default), so the predictions in the input geometry can be scored
against the original labels and compared with the metrics of the training-time evaluation.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from _cli import REPO, cli_env, run_module

from cinjax import build, checkpointing, postprocess, runspec
from cinjax.data import preprocess
from cinjax.data.datalist import Entry, label_code_map
from cinjax.data.io import load_image
from cinjax.predict import Predictor

RECORDS = ("config.json", "metrics.jsonl", os.path.join("eval", "results.json"), "inference.json")


_env, _run = cli_env, run_module


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    cache = tmp_path_factory.mktemp("cache")
    args = [
        f"--config.data.root={root}",
        f"--config.data.cache_dir={cache}",
        "--config.data.phantom.num_ct=3",
        "--config.data.phantom.num_mr=3",
        "--config.data.phantom.num_val=1",
        "--config.data.phantom.num_test=1",
        "--config.data.spacing=()",
        "--config.data.roi=(16,16,16)",
        "--config.data.preprocess_workers=0",
        "--config.model.channels=(4,8)",
        "--config.model.strides=(1,2)",
        "--config.loader.global_batch_size=2",
        "--config.loader.prefetch=0",
        "--config.train.async_checkpoint=False",
        "--config.train.min_free_gb=0.01",
        "--config.optim.schedule.warmup_steps=2",
    ]
    return root, args


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom):
    _, args = phantom
    workdir = tmp_path_factory.mktemp("run")
    _run(
        [
            "--config",
            os.path.join(REPO, "configs/demo.py"),
            f"--workdir={workdir}",
            *args,
            "--config.train.num_steps=4",
            "--config.train.eval_every=2",
            "--config.train.checkpoint_every=2",
            "--config.predict.after_train=True",
            "--config.predict.split=validation",
            "--config.predict.postprocess=False",
        ]
    )
    return workdir


def _digests(run):
    return {r: hashlib.sha256(open(os.path.join(run, r), "rb").read()).hexdigest() for r in RECORDS}


def _validation(root):
    """(image, label) paths of the phantom's validation volumes."""
    out = []
    for name in ("CT.json", "MR.json"):
        doc = json.load(open(os.path.join(root, name)))
        out += [(os.path.join(root, e["image"]), os.path.join(root, e["label"])) for e in doc["validation"]]
    return out


def _link_folder(folder, paths):
    folder.mkdir()
    for p in paths:
        os.symlink(p, folder / os.path.basename(p))
    return folder


def test_the_run_describes_itself(trained):
    spec = runspec.read(trained)
    assert spec.spacing == () and spec.roi == (16, 16, 16)
    assert spec.modalities == {"CT": 0, "MR": 1}
    assert spec.class_to_code() == [0, 500, 600, 420, 550, 205, 820, 850]
    assert spec.model["name"] == "unet_vanilla" and spec.model["channels"] == [4, 8]
    decision = json.load(open(trained / "postprocessing.json"))
    assert set(decision["largest_component"]) == {"CT", "MR"} and decision["step"] == 4
    for per_class in decision["dice"].values():
        for name, d in per_class.items():
            assert (name in decision["largest_component"]["CT"] + decision["largest_component"]["MR"]) or (
                d["with"] <= d["without"]
            )
    # The checkpoint's own spec reads through a step directory too.
    assert runspec.read(trained / "checkpoints" / "latest" / "4") == spec


def test_in_memory_preprocessing_equals_the_cache(phantom):
    """Prediction preprocesses in memory what training cached: same arrays, resampled or not."""
    root, _ = phantom
    mr = next(img for img, _ in _validation(root) if "mr_" in os.path.basename(img))
    for spacing in ((), (4.0, 3.0, 5.0)):
        intensity = {"mode": "minmax", "window": [-175.0, 250.0], "percentiles": [0.5, 99.5]}
        task = preprocess.Task(
            entry=Entry(mr, None, 1, "test", "x"),
            modality_name="MR",
            needs_foreground=False,
            codes=label_code_map("mmwhs", 8),
            affine_atol=1e-3,
            spacing=spacing,
            roi=(16, 16, 16),
            intensity=intensity,
        )
        cached, _, meta = preprocess.preprocess_volume(task)
        image, geom = load_image(mr)
        volume, _, grid = preprocess.preprocess_image(
            image, geom, spacing=spacing, roi=(16, 16, 16), intensity=intensity
        )
        np.testing.assert_array_equal(volume, cached)
        assert grid["affine"] == meta["affine"] and grid["shape"] == meta["shape"]


@pytest.fixture(scope="module")
def predictor(trained):
    return Predictor.from_run(trained, "latest", postprocess=False)


def test_windows_split_over_every_device(predictor):
    import jax

    assert jax.local_device_count() == 8
    assert predictor.window.windows_per_call == 16 and predictor.mesh.devices.size == 8
    x = predictor._put(np.zeros((8, 16, 16, 16, 1), np.float32))
    assert len(x.sharding.device_set) == 8 and x.addressable_shards[0].data.shape[0] == 1
    with pytest.raises(ValueError, match="multiple of 8"):
        build.check_windows_per_call(3)


def test_window_logits_and_tta(trained, predictor):
    rng = np.random.default_rng(0)
    windows = rng.random((5, 16, 16, 16, 1), np.float32)
    modality = np.array([0, 1, 0, 1, 1], np.int32)
    plain = predictor.window_logits(windows, modality)
    assert plain.shape == (5, 16, 16, 16, 8) and plain.dtype == np.float32
    variables = checkpointing.restore_inference_variables(trained, prefer="latest")
    from cinjax import steps

    model = build.model_from_spec(predictor.spec)
    direct = steps.predict_logits({"params": variables.params}, windows, modality, model=model)
    np.testing.assert_allclose(plain, np.asarray(direct), atol=1e-5)

    tta = Predictor.from_run(trained, "latest", tta_axes=(0, 1, 2), postprocess=False)
    assert len(tta.flips) == 8
    expected = np.mean(
        [
            np.flip(
                predictor.window_logits(np.flip(windows, [1 + a for a in f]), modality), [1 + a for a in f]
            )
            for f in build.ALL_FLIPS
        ],
        axis=0,
    )
    np.testing.assert_allclose(tta.window_logits(windows, modality), expected, atol=1e-5)


def test_ensemble_with_itself_and_probabilities(trained, phantom, predictor):
    root, _ = phantom
    image = _validation(root)[0][0]
    labels = predictor.predict(image, "CT")
    twice = Predictor.from_run(trained, "latest", ensemble=[trained], postprocess=False)
    assert len(twice.members) == 2
    same, probs = twice.predict(image, "CT", probabilities=True)
    np.testing.assert_array_equal(same, labels)
    assert probs.shape == (*labels.shape, 8)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    codes = np.asarray(predictor.spec.class_to_code())
    np.testing.assert_array_equal(codes[probs.argmax(-1)], labels)


def test_largest_component_is_applied_only_where_chosen(predictor, phantom):
    blobs = np.zeros((9, 9, 9), np.uint8)
    blobs[1:4, 1:4, 1:4] = 2  # 27 voxels
    blobs[6:8, 6:8, 6:8] = 2  # 8 voxels: dropped
    blobs[6:8, 0:2, 0:2] = 3  # another class, untouched
    out = postprocess.keep_largest_component(blobs, [2])
    assert (out == 2).sum() == 27 and (out[6:8, 6:8, 6:8] == 0).all() and (out == 3).sum() == 8

    decision = postprocess.decide(
        [("CT", {1: (0.5, 0.7), 2: (0.8, 0.6)}), ("CT", {1: (0.5, 0.5)}), ("MR", {1: (0.4, 0.4)})],
        ["bg", "A", "B"],
    )
    assert decision["largest_component"] == {"CT": ["A"], "MR": []}

    root, _ = phantom
    image = _validation(root)[0][0]  # a CT volume
    plain = predictor.predict(image, "CT")
    filtered = Predictor(
        predictor.spec.with_postprocessing({"CT": ["LV"], "MR": []}),
        [(build.model_from_spec(predictor.spec), *_variables(predictor), "x", None)],
        postprocess=True,
    )
    got = filtered.predict(image, "CT")
    lv = predictor.spec.class_to_code()[predictor.spec.class_names.index("LV")]
    ids = {c: i for i, c in enumerate(predictor.spec.class_to_code())}
    expected_ids = postprocess.keep_largest_component(np.vectorize(ids.get)(plain), [ids[lv]])
    np.testing.assert_array_equal(got, np.asarray(predictor.spec.class_to_code())[expected_ids])
    np.testing.assert_array_equal(got[plain != lv], plain[plain != lv])
    # The MR rule is empty: MR predictions are unchanged.
    assert filtered.spec.largest_component_classes("MR") == ()


def _variables(predictor):
    v = checkpointing.restore_inference_variables(predictor.members[0].source)
    return v.params, v.model_state


def test_scoring_the_predictions_equals_the_evaluation(trained, phantom, tmp_path):
    root, _ = phantom
    gt = _link_folder(tmp_path / "gt", [label for _, label in _validation(root)])
    out = tmp_path / "scores.json"
    _run(
        ["--pred", str(trained / "predictions"), "--gt", str(gt), "--out", str(out)], module="cinjax.evaluate"
    )
    scored = json.load(open(out))
    evaluated = json.load(open(trained / "eval" / "results.json"))
    for m, r in evaluated["modalities"].items():
        for name, c in r["classes"].items():
            for k in ("dice", "hd95_mm", "assd_mm"):
                a, b = c[k], scored["modalities"][m]["classes"][name][k]
                assert (a is None and b is None) or abs(a - b) < 1e-6, (m, name, k, a, b)
    assert abs(scored["mean_dice"] - evaluated["mean_dice"]) < 1e-6


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_predict_cli_needs_no_config_and_two_processes_split_the_volumes(trained, phantom, tmp_path):
    """`cinjax.predict --run` with no config, on 2 processes: each predicts its share, the labels equal
    the training-time predictions (input shape and affine, uint16 codes), and the run is untouched."""
    root, _ = phantom
    before = _digests(trained)
    images = [img for img, _ in _validation(root)]
    folder = _link_folder(tmp_path / "inputs", images)
    out = tmp_path / "out"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cinjax.predict", "--run", str(trained), "--input", str(folder)]
            + ["--output", str(out), "--checkpoint", "latest", "--no_postprocess"]
            + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=REPO,
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert _digests(trained) == before
    names = sorted(os.path.basename(i).replace("image", "label") for i in images)
    assert sorted(os.listdir(out)) == names
    assert all("1 prediction(s) on this process" in log for log in logs), logs
    assert "wrote 2 prediction(s)" in logs[0]
    for img in images:
        name = os.path.basename(img).replace("image", "label")
        got, ref, src = (nib.load(str(p)) for p in (out / name, trained / "predictions" / name, img))
        assert got.shape == src.shape and got.get_data_dtype() == np.uint16
        np.testing.assert_allclose(got.affine, src.affine, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(ref.dataobj))


def test_predict_cli_errors_are_one_line(trained, tmp_path):
    proc = _run(
        ["--run", str(tmp_path), "--input", str(tmp_path), "--output", str(tmp_path / "o")],
        module="cinjax.predict",
        check=False,
    )
    assert proc.returncode == 1 and "cinjax.predict: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "not a run directory" in proc.stderr
    img = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(img))
    from cinjax.predict import resolve_inputs

    spec = runspec.read(trained)
    with pytest.raises(ValueError, match="--modality"):
        resolve_inputs(str(img), spec)
    assert resolve_inputs(str(img), spec, modality="mr") == [(str(img), 1)]
