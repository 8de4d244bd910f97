"""`python -m cinjax.analyze_cin`: CIN tables, their distances, wrong-modality Dice and figures.

The three-modality run of tests/conftest.py (``three_modalities``: CT, MR and MR2 rows, trained through
the real CLI) is analysed through the real CLI with the same device count, so the diagonal of the
wrong-modality matrix must reproduce the run's own ``eval/results.json``.
"""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _cli import run_module as _run
from PIL import Image

from cinjax import analyze_cin, build, checkpointing, runspec, workdir

M_NAMES = ["CT", "MR"]  # hand-built trees
RUN_NAMES = ["CT", "MR", "MR2"]  # the three-modality run


@pytest.fixture(scope="module")
def cin_run(three_modalities):
    return three_modalities[2]


@pytest.fixture(scope="module")
def analysis(cin_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    proc = _run(
        ["--run", str(cin_run), "--checkpoint", "latest", "--out", str(out)], module="cinjax.analyze_cin"
    )
    assert "CIN layer(s)" in proc.stdout
    return json.load(open(out / analyze_cin.JSON_NAME)), out


def _expected_cin_shapes(spec):
    """``{layer: (M, C)}`` of the run's model, from its abstract init (nothing is computed)."""
    shapes = _abstract_params(spec)
    fake = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    return {k: v["scale"].shape for k, v in analyze_cin.cin_tables(fake, len(spec.modalities)).items()}


def _abstract_params(spec):
    model = build.model_from_spec(spec)
    image, modality = np.zeros((1, *spec.roi, 1), np.float32), np.zeros((1,), np.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image, modality))["params"]


def test_tables_have_the_model_shapes_and_values(cin_run, analysis):
    doc, _ = analysis
    spec = runspec.read(cin_run)
    assert doc["modalities"] == {"CT": 0, "MR": 1, "MR2": 2} and doc["step"] == 3
    expected = _expected_cin_shapes(spec)
    assert expected and list(doc["layers"]) == list(expected)  # the encoder norms only (decoder: instance)
    params = checkpointing.restore_inference_variables(cin_run, prefer="latest").params
    tables = analyze_cin.cin_tables(params, 3)
    for layer, (m, c) in expected.items():
        e = doc["layers"][layer]
        assert m == 3 and e["channels"] == c == 8
        for q in ("scale", "bias"):
            assert np.asarray(e[q]).shape == (m, c)
            np.testing.assert_allclose(e[q], tables[layer][q], rtol=0, atol=1e-7)
            for i, name in enumerate(RUN_NAMES):
                assert e["stats"][name][f"{q}_mean"] == pytest.approx(np.mean(e[q][i]), abs=1e-9)
                assert e["stats"][name][f"{q}_std"] == pytest.approx(np.std(e[q][i]), abs=1e-9)
            d = e["distance"][q]
            for a in RUN_NAMES:
                assert d[a][a] == 0.0
                for b in RUN_NAMES:
                    assert d[a][b] == d[b][a] >= 0.0
                    assert e["cosine"][q][a][b] == e["cosine"][q][b][a]
            want = np.linalg.norm(np.subtract(*e[q][:2])) / np.sqrt(c)
            assert d["CT"]["MR"] == pytest.approx(want, rel=1e-9)
        assert e["cosine"]["scale"]["CT"]["CT"] == pytest.approx(1.0)
    # The source run's CT and MR rows differ (tests/conftest.py), and MR2 trained away from their mean.
    assert all(e["distance"]["scale"]["CT"]["MR"] > 0 for e in doc["layers"].values())
    summary = doc["summary"]
    assert summary["num_layers"] == len(expected)
    assert summary["most_different_layer"] == summary["ranking"][0]["layer"]
    combined = [r["combined"] for r in summary["ranking"]]
    assert combined == sorted(combined, reverse=True)


def test_wrong_modality_diagonal_is_the_run_evaluation(cin_run, analysis):
    doc, _ = analysis
    wrong = doc["wrong_modality"]
    results = json.load(open(cin_run / "eval" / "results.json"))
    assert results["step"] == doc["step"] and wrong["split"] == "validation"
    assert wrong["modalities"] == RUN_NAMES and wrong["n_volumes"] == {"CT": 1, "MR": 1, "MR2": 1}
    matrix = np.array([[wrong["dice"][t][u] for u in RUN_NAMES] for t in RUN_NAMES])
    assert matrix.shape == (3, 3) and np.all((matrix >= 0) & (matrix <= 1))
    for t in RUN_NAMES:
        assert abs(wrong["dice"][t][t] - results["modalities"][t]["mean_dice"]) < 1e-6
        assert abs(wrong["whole_heart_dice"][t][t] - results["modalities"][t]["whole_heart_dice"]) < 1e-6
        for u in RUN_NAMES:
            assert wrong["drop"][t][u] == pytest.approx(wrong["dice"][t][t] - wrong["dice"][t][u])
    assert [v["modality"] for v in wrong["volumes"]] == RUN_NAMES


def test_figures_are_pngs(analysis):
    doc, out = analysis
    assert doc["figures"] == {
        "tables": "tables.png",
        "distances": "distances.png",
        "wrong_modality": "wrong_modality.png",
    }
    for name in doc["figures"].values():
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
            im.verify()


def test_cli_errors_are_one_line_with_status_2(cin_run, tmp_path):
    # A non-conditional model: a convert-style directory (params + inference.json) of an instance-norm net.
    spec = runspec.read(cin_run)
    flat = runspec.InferenceSpec.from_json(
        dict(spec.to_json(), model=dict(spec.model, encoder_norm="instance"))
    )
    plain = tmp_path / "plain"
    plain.mkdir()
    shapes = _abstract_params(flat)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(plain / workdir.CONVERTED_PARAMS, jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes))
    ckptr.wait_until_finished()
    flat.write(plain)
    for run, message in ((plain, "no conditional instance norm"), (tmp_path / "missing", "does not exist")):
        proc = _run(["--run", str(run), "--tables_only"], module="cinjax.analyze_cin", check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert lines[-1].startswith("cinjax.analyze_cin: error:") and message in lines[-1], proc.stderr
        assert "Traceback" not in proc.stderr
        assert sum(x.startswith("cinjax.analyze_cin") for x in lines) == 1


def test_table_extraction_on_a_hand_built_tree():
    ones, zeros = np.ones((2, 4)), np.zeros((2, 4))
    params = {
        "params": {
            "block_10": {"norm": {"scale": ones, "bias": zeros}},
            "block_2": {
                "norm": {"scale": np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 3.0]]), "bias": zeros},
                "conv": {"kernel": np.zeros((3, 3, 3, 4, 4)), "bias": np.zeros(4)},
            },
            "plain": {"scale": np.ones(4), "bias": np.zeros(4)},  # instance norm with affine: (C,)
            "three": {"scale": np.ones((3, 4)), "bias": np.zeros((3, 4))},  # another modality count
            "odd": {"scale": ones, "bias": zeros, "extra": zeros},  # not a norm's params
            "dense": {"kernel": np.zeros((2, 4)), "bias": np.zeros((2, 4))},
        }
    }
    tables = analyze_cin.cin_tables(params, 2)
    assert list(tables) == ["block_2/norm", "block_10/norm"]  # natural order
    assert all(t["scale"].shape == t["bias"].shape == (2, 4) for t in tables.values())
    assert list(analyze_cin.cin_tables(params["params"], 3)) == ["three"]
    assert analyze_cin.cin_tables(params, 5) == {}

    e = analyze_cin.layer_numbers(tables["block_2/norm"]["scale"], tables["block_2/norm"]["bias"], M_NAMES)
    assert e["channels"] == 4 and e["scale"][1] == [1.0, 1.0, 1.0, 3.0]
    assert e["distance"]["scale"]["CT"]["MR"] == pytest.approx(1.0)  # |(0,0,0,2)| / sqrt(4)
    assert e["distance"]["bias"]["CT"]["MR"] == 0.0
    assert e["cosine"]["scale"]["CT"]["MR"] == pytest.approx(6 / (2 * np.sqrt(12)))
    assert np.isnan(e["cosine"]["bias"]["CT"]["MR"])  # zero rows have no direction
    assert e["stats"]["MR"]["scale_mean"] == pytest.approx(1.5)
    assert e["stats"]["MR"]["scale_std"] == pytest.approx(np.std([1, 1, 1, 3]))
    layers = {k: analyze_cin.layer_numbers(t["scale"], t["bias"], M_NAMES) for k, t in tables.items()}
    summary = analyze_cin.summarize_layers(layers, M_NAMES)
    assert summary["most_different_layer"] == "block_2/norm"
    assert summary["by_pair"]["CT|MR"]["scale"] == {"layer": "block_2/norm", "distance": pytest.approx(1.0)}
